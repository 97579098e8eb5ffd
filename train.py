"""Train U-ViT / U-ViC diffusion models from Hydra configs, on one CPU, one GPU or many GPUs and nodes.

    python train.py                                         # quickstart: a tiny U-ViC on scikit-learn digits
    python train.py experiment=cifar10_uvic_s2 optim.lr=1e-4 model.depth=16
    accelerate launch --multi_gpu --num_processes 8 train.py experiment=imagenet64_uvic_m4 data.root=...
    accelerate launch --multi_gpu --num_processes 2 train.py train.cpu=true   # several CPU processes (gloo)

Everything lands in `run_dir` (the layout: `uvit_cog.rundir`): config.yaml, metrics.jsonl, sample grids,
verified atomic checkpoints with the EMA exported as a `UViTPipeline` (`uvit_cog.checkpoints`), and the final
export `RUN/pipeline/`. A run that dies continues from its newest intact checkpoint when started again
(`resume=auto`). This file and train_setup.py (the config's checks and builders) are the only places that read
the Hydra config: the library gets explicit values.
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
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from train_setup import (
    build_model,
    check_resume,
    diffusion_setup,
    tracker_config,
    validate_config,
    validation_runs,
)
from uvit_cog import UViTPipeline
from uvit_cog.checkpoints import (
    CheckpointError,
    export_final_pipeline,
    export_pipeline,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
    select_checkpoint_for_all,
)
from uvit_cog.data import (
    GlobalBatchSampler,
    build_dataset,
    build_validation_dataset,
    read_latent_meta,
    sample_latents,
)
from uvit_cog.rundir import MetricsLog, RunInUseError, RunLock, atomic_write, write_config
from uvit_cog.sampling import sample_and_evaluate, sample_grid
from uvit_cog.schedule import default_scheduler
from uvit_cog.training import (
    GlobalBatchRandom,
    check_ranks_in_sync,
    diffusion_loss,
    ema_decay_at,
    update_ema,
    validation_images,
    validation_loss,
)

# ----------------------------------------------------------------------------------------------------------
# Training


def train(cfg: DictConfig) -> Path:
    """Train from a composed config and return the run directory."""
    validate_config(cfg, PartialState(cpu=cfg.train.cpu).num_processes)
    run_dir = Path(cfg.run_dir)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu,
                              step_scheduler_with_optimizer=False, log_with=list(cfg.log.trackers) or None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "trackers")))
    lock = RunLock(run_dir)
    if accelerator.is_main_process:  # one training per run directory; the ranks of one launch share it
        for note in filter(None, [lock.acquire(), *recover_checkpoints(run_dir)]):
            accelerator.print(f"{run_dir}: {note}")
    try:
        return run_training(cfg, accelerator)
    finally:
        lock.release()


def run_training(cfg: DictConfig, accelerator: Accelerator) -> Path:
    """The training itself, once the run directory is this process's and interrupted saves are undone."""
    run_dir = Path(cfg.run_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    resume_from = select_checkpoint_for_all(accelerator, run_dir, cfg.resume)  # after the recovery above
    provenance = check_resume(cfg, resume_from, log=accelerator.print)  # what the checkpoints record as this run

    # Data: each rank loads its slice of every global micro-batch (see GlobalBatchSampler).
    data = OmegaConf.to_container(cfg.data, resolve=True)  # the library gets plain values, never a DictConfig
    dataset = build_dataset(data)
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
    noise_schedule, objective = diffusion_setup(cfg)
    pipeline = UViTPipeline(transformer=ema, scheduler=default_scheduler(noise_schedule),
                            vae=vae.to(device) if vae is not None else None)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = cfg.model.num_classes

    step, images_seen, skipped = 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, ema)
        step, images_seen, skipped = state["step"], state["images_seen"], state.get("skipped_steps", 0)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    sampler = GlobalBatchSampler(len(dataset), micro_batch, rank, world, cfg.seed, start=images_seen)
    batches = iter(DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=cfg.data.num_workers,
                              pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0))
    if cfg.log.trackers:
        accelerator.init_trackers(cfg.name, config=tracker_config(cfg),
                                  init_kwargs={"tensorboard": {"purge_step": step + 1}})  # drop the dead run's tail
    metrics = MetricsLog(run_dir, accelerator.is_main_process, resume_step=step,
                         trackers=(lambda values, at: accelerator.log(values, step=at)) if cfg.log.trackers else None)
    accelerator.print(f"{type(ema).__name__}: {sum(p.numel() for p in ema.parameters()) / 1e6:.2f} M parameters, "
                      f"{len(dataset)} training items, {world} process(es), run directory {run_dir}")
    if accelerator.is_main_process:  # once the data and model are built: a start that fails before writes nothing
        write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))

    def checkpoint() -> None:
        check_ranks_in_sync(accelerator, model=accelerator.unwrap_model(model), ema=ema)
        train_state = {"step": step, "images_seen": images_seen, "processes": world, "skipped_steps": skipped}
        save_checkpoint(accelerator, run_dir, step, train_state, lambda out: export_pipeline(ema, noise_schedule, vae,
                        out), cfg.log.keep_checkpoints, provenance)

    # The validation loss (main process, fixed images, noise and t grid): val.* and uvit_cog.training.validation_loss.
    val_x0 = val_labels = None
    if validation_runs(cfg):
        val_x0, val_labels = validation_images(
            build_validation_dataset(data), cfg.val.num_images,
            seed=cfg.val.seed, latent_scale=cfg.data.scale_factor if latent else None)
        val_labels = val_labels if num_classes else None

    def validate() -> None:
        if accelerator.is_main_process:
            start = time.perf_counter()
            with accelerator.autocast():
                record = validation_loss(ema if cfg.val.ema else accelerator.unwrap_model(model), objective, val_x0,
                                         val_labels, cfg.val.num_timesteps, cfg.val.seed, cfg.val.batch_size)
            metrics.log({"step": step, **record, "val_num_images": len(val_x0),
                         "val_seconds": time.perf_counter() - start})
        accelerator.wait_for_everyone()

    def save_grid() -> None:
        if accelerator.is_main_process:
            s = cfg.sample
            with accelerator.autocast():
                grid = sample_grid(pipeline, n=s.grid_size, seed=s.seed, num_inference_steps=s.steps,
                                   guidance_scale=s.guidance, scheduler=s.scheduler, batch_size=s.batch_size)
            path = run_dir / "samples" / f"step_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                grid.save(f, format="PNG")
        accelerator.wait_for_everyone()

    progress = tqdm(total=cfg.train.steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    logged_steps, interval_steps, clock, paused = 0, 0, time.perf_counter(), 0.0
    while step < cfg.train.steps:
        model.train()
        loss_step = torch.zeros((), device=device)
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
                loss = diffusion_loss(model, objective, x, labels, rnd)
                accelerator.backward(loss / cfg.train.grad_accum)
            loss_step += loss.detach() / cfg.train.grad_accum
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
        # A non-finite loss (any rank's) or gradient norm (already reduced over ranks) never reaches the weights
        # or the EMA. Under fp16 the loss scaler's own overflow skips are counted the same way: optimizer.step()
        # is still called then, so that the scaler lowers its scale and training recovers.
        loss_bad = accelerator.reduce((~torch.isfinite(loss_step)).float(), "sum") > 0
        lr = lr_scheduler.get_last_lr()[0]  # the rate of this step
        if loss_bad or (not torch.isfinite(norm) and accelerator.scaler is None):
            if cfg.train.nonfinite == "stop":
                raise FloatingPointError(
                    f"step {step + 1}: non-finite {'loss' if loss_bad else 'gradient norm'}; the weights are "
                    "those of the last good step. Lower optim.lr, set train.max_grad_norm, or use "
                    "train.nonfinite=skip to skip such steps")
            stepped = False
        else:
            optimizer.step()
            stepped = not accelerator.optimizer_step_was_skipped
        optimizer.zero_grad(set_to_none=True)
        if stepped:
            lr_scheduler.step()
            update_ema(ema, accelerator.unwrap_model(model), ema_decay_at(step + 1, cfg.train.ema_decay,
                                                                          cfg.train.ema_warmup))
            loss_sum += loss_step
            norm_sum += norm
            logged_steps += 1
        else:
            skipped += 1
            accelerator.print(f"step {step + 1}: non-finite loss or gradients, step skipped ({skipped} so far)")
        step += 1
        interval_steps += 1
        images_seen += cfg.train.batch_size
        progress.update(1)

        if step % cfg.log.every == 0 or step == cfg.train.steps:
            n = max(logged_steps, 1)  # the steps that updated the weights; all of them unless some were skipped
            loss_avg = accelerator.reduce(loss_sum, "mean").item() / n
            seconds = time.perf_counter() - clock - paused  # training only, not sampling or saving
            record = {"step": step, "loss": loss_avg if logged_steps else None, "lr": lr,
                      "grad_norm": norm_sum.item() / n if logged_steps else None, "skipped_steps": skipped,
                      "images_per_s": interval_steps * cfg.train.batch_size / seconds, "images_seen": images_seen}
            metrics.log(record)
            progress.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{record['images_per_s']:.1f}")
            loss_sum.zero_()
            norm_sum.zero_()
            logged_steps, interval_steps, clock, paused = 0, 0, time.perf_counter(), 0.0
        pause_start = time.perf_counter()
        if val_x0 is not None and step % cfg.val.every == 0:
            validate()
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            save_grid()
        if cfg.fid.every and step % cfg.fid.every == 0:
            f = cfg.fid
            with accelerator.autocast():
                record = sample_and_evaluate(
                    pipeline, f.num_images, f.reference, metrics=("fid",), weights=f.weights, scheduler=f.scheduler,
                    num_inference_steps=f.steps, guidance_scale=f.guidance, seed=f.seed, batch_size=f.batch_size,
                    samples_dir=run_dir / "fid" / f"step_{step:07d}", delete_samples=True, accelerator=accelerator,
                    progress=False)
            if record is not None:  # the main process
                metrics.log({"step": step, "fid": float(record["metrics"]["frechet_inception_distance"]),
                             "fid_num_images": f.num_images})
        if cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            checkpoint()
        paused += time.perf_counter() - pause_start
    progress.close()

    if not (cfg.log.sample_every and step % cfg.log.sample_every == 0):
        save_grid()  # the final grid
    if accelerator.is_main_process:
        out = export_final_pipeline(ema, noise_schedule, vae, run_dir)
        accelerator.print(f"done: EMA pipeline in {out}, sample grids in {run_dir / 'samples'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (CheckpointError, FloatingPointError, RunInUseError) as e:  # said in full: no traceback needed
        raise SystemExit(f"train.py: {e}") from None


if __name__ == "__main__":
    main()
