"""Train U-ViT / U-ViC diffusion models from Hydra configs, on one CPU, one GPU or many GPUs and nodes.

    python train.py                                         # quickstart: a tiny U-ViC on scikit-learn digits
    python train.py experiment=cifar10_uvic_s2 optim.lr=1e-4 model.depth=16
    accelerate launch --multi_gpu --num_processes 8 train.py experiment=imagenet64_uvic_m4 data.root=...
    accelerate launch --multi_gpu --num_processes 2 train.py train.cpu=true   # several CPU processes (gloo)

Everything lands in `run_dir` (see `uvit_cog.train_utils`): config.yaml, metrics.jsonl, sample grids,
atomic checkpoints with the EMA exported as a `UViTPipeline`, and the final export `RUN/pipeline/`.
A run that dies continues from its latest checkpoint when started again (`resume=auto`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from uvit_cog import UViTModel, UViTPipeline
from uvit_cog.data import GlobalBatchSampler, build_dataset, read_latent_meta, sample_latents
from uvit_cog.schedule import scheduler_config
from uvit_cog.train_utils import (
    GlobalBatchRandom,
    MetricsLogger,
    check_ranks_in_sync,
    diffusion_loss,
    ema_decay_at,
    evaluate_fid,
    export_final_pipeline,
    export_pipeline,
    find_resume_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    save_sample_grid,
    update_ema,
    validate_config,
    write_config,
)


def build_model(cfg: DictConfig) -> UViTModel:
    """The `model` config group: a preset name (null for none) plus every `UViTModel` argument."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    preset = kwargs.pop("preset")
    return UViTModel.from_preset(preset, **kwargs) if preset else UViTModel(**kwargs)


def train(cfg: DictConfig) -> Path:
    """Train from a composed config and return the run directory."""
    validate_config(cfg, PartialState(cpu=cfg.train.cpu).num_processes)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu,
                              step_scheduler_with_optimizer=False)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run_dir = Path(cfg.run_dir)
    resume_from = find_resume_checkpoint(cfg)
    accelerator.wait_for_everyone()  # every rank has looked for checkpoints before the main process writes
    if accelerator.is_main_process:
        remove_partial_checkpoints(run_dir)
        write_config(cfg, run_dir)

    # Data: each rank loads its slice of every global micro-batch (see GlobalBatchSampler).
    dataset = build_dataset(cfg.data)
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum  # global
    local_batch = micro_batch // world
    latent = cfg.data.kind == "latents"
    vae = AutoencoderKL.from_pretrained(cfg.data.vae or read_latent_meta(cfg.data.root)["vae"]) if latent else None

    # Model, EMA, optimiser, LR schedule, noise schedule.
    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    lr_scheduler = get_scheduler(cfg.optim.lr_schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=cfg.train.steps)
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(ema)
    noise_schedule = scheduler_config(**cfg.diffusion)
    noise_scheduler = DDPMScheduler.from_config(noise_schedule)
    pipeline = UViTPipeline(transformer=ema, scheduler=DDPMScheduler.from_config(noise_schedule),
                            vae=vae.to(device) if vae is not None else None)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = cfg.model.num_classes

    step, images_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        step, images_seen = state["step"], state["images_seen"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    sampler = GlobalBatchSampler(len(dataset), micro_batch, rank, world, cfg.seed, start=images_seen)
    batches = iter(DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg.data.num_workers,
                              pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0))
    metrics = MetricsLogger(run_dir, accelerator.is_main_process, cfg.log.tensorboard, resume_step=step)
    accelerator.print(f"{type(ema).__name__}: {sum(p.numel() for p in ema.parameters()) / 1e6:.2f} M parameters, "
                      f"{len(dataset)} training items, {world} process(es), run directory {run_dir}")

    def checkpoint() -> None:
        check_ranks_in_sync(accelerator, model=accelerator.unwrap_model(model), ema=ema)
        save_checkpoint(accelerator, run_dir, step, {"step": step, "images_seen": images_seen, "processes": world},
                        lambda out: export_pipeline(ema, noise_schedule, vae, out), cfg.log.keep_checkpoints)

    def sample_grid() -> None:
        if accelerator.is_main_process:
            with accelerator.autocast():
                save_sample_grid(pipeline, cfg.sample, run_dir / "samples" / f"step_{step:07d}.png")
        accelerator.wait_for_everyone()

    progress = tqdm(total=cfg.train.steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    logged_steps, clock, paused = 0, time.perf_counter(), 0.0
    while step < cfg.train.steps:
        model.train()
        for micro in range(cfg.train.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            offset = micro * micro_batch + rank * local_batch  # this slice's rows in the global batch
            rnd = GlobalBatchRandom(cfg.seed, step, offset, local_batch, cfg.train.batch_size, device)
            if cfg.data.hflip:
                x = torch.where(rnd.rand()[:, None, None, None] < 0.5, x.flip(-1), x)
            if latent:
                x = sample_latents(x, cfg.data.scale_factor, rnd.randn(x.shape[1] // 2, *x.shape[2:]))
            labels = None
            if num_classes:  # label dropout: the null label num_classes, for classifier-free guidance
                labels = torch.where(rnd.rand() < cfg.train.label_dropout, num_classes, y)
            last = micro == cfg.train.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = diffusion_loss(model, noise_scheduler, x, labels, rnd)
                accelerator.backward(loss / cfg.train.grad_accum)
            loss_sum += loss.detach() / cfg.train.grad_accum
        norm_sum += accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
        lr = lr_scheduler.get_last_lr()[0]  # the rate of this step
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = ema_decay_at(step, cfg.train.ema_decay, cfg.train.ema_warmup)
        update_ema(ema, accelerator.unwrap_model(model), decay)
        images_seen += cfg.train.batch_size
        logged_steps += 1
        progress.update(1)

        if step % cfg.log.every == 0 or step == cfg.train.steps:
            loss_avg = accelerator.reduce(loss_sum, "mean").item() / logged_steps
            seconds = time.perf_counter() - clock - paused  # training only, not sampling or saving
            record = {"step": step, "loss": loss_avg, "lr": lr,
                      "grad_norm": norm_sum.item() / logged_steps,
                      "images_per_s": logged_steps * cfg.train.batch_size / seconds, "images_seen": images_seen}
            metrics.log(record)
            progress.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{record['images_per_s']:.1f}")
            loss_sum.zero_()
            norm_sum.zero_()
            logged_steps, clock, paused = 0, time.perf_counter(), 0.0
        pause_start = time.perf_counter()
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            sample_grid()
        if cfg.fid.every and step % cfg.fid.every == 0:
            with accelerator.autocast():
                fid = evaluate_fid(accelerator, pipeline, cfg.fid, cfg.sample, run_dir / "fid" / f"step_{step:07d}")
            metrics.log({"step": step, "fid": fid, "fid_num_images": cfg.fid.num_images})
        if cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            checkpoint()
        paused += time.perf_counter() - pause_start
    progress.close()

    if not (cfg.log.sample_every and step % cfg.log.sample_every == 0):
        sample_grid()  # the final grid
    if accelerator.is_main_process:
        out = export_final_pipeline(ema, noise_schedule, vae, run_dir)
        accelerator.print(f"done: EMA pipeline in {out}, sample grids in {run_dir / 'samples'}")
    accelerator.wait_for_everyone()
    metrics.close()
    return run_dir


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
