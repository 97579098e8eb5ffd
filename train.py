"""Train U-ViT / U-ViC diffusion models from Hydra configs, on one CPU, one GPU or many GPUs and nodes.

    python train.py                                         # quickstart: a tiny U-ViC on scikit-learn digits
    python train.py experiment=cifar10_uvic_s2 optim.lr=1e-4 model.depth=16
    accelerate launch --multi_gpu --num_processes 8 train.py experiment=imagenet64_uvic_m4 data.root=...
    accelerate launch --multi_gpu --num_processes 2 train.py train.cpu=true   # several CPU processes (gloo)

Everything lands in `run_dir` (the layout: `uvit_cog.rundir`): config.yaml, metrics.jsonl, sample grids,
verified atomic checkpoints with the EMA exported as a `UViTPipeline` (`uvit_cog.checkpoints`), and the final
export `RUN/pipeline/`. A run that dies continues from its newest intact checkpoint when started again
(`resume=auto`). This file is the only place that reads the Hydra config: the library gets explicit values.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import tempfile
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from uvit_cog import UViTPipeline
from uvit_cog.backbones import backbone_arguments, build_backbone
from uvit_cog.checkpoints import (
    TRAIN_STATE,
    CheckpointError,
    export_final_pipeline,
    export_pipeline,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
    select_checkpoint,
)
from uvit_cog.data import (
    DATA_KINDS,
    VAL_SPLITS,
    GlobalBatchSampler,
    build_dataset,
    build_validation_dataset,
    read_latent_meta,
    sample_latents,
)
from uvit_cog.rundir import MetricsLog, RunInUseError, RunLock, atomic_write, read_config, write_config
from uvit_cog.sampling import sample_and_evaluate, sample_grid
from uvit_cog.schedule import Objective, check_scheduler, default_scheduler, make_objective, scheduler_config
from uvit_cog.training import (
    GlobalBatchRandom,
    check_ranks_in_sync,
    diffusion_loss,
    ema_decay_at,
    update_ema,
    validation_images,
    validation_loss,
)

MIXED_PRECISION = ("no", "bf16", "fp16")
NONFINITE = ("skip", "stop")
# The path field each data kind needs, and what it should point at (for the error message).
DATA_PATHS = {
    "npz": ("path", "/path/to/images.npz (uint8 NHWC arrays x_train/y_train, or ADM's arr_0)"),
    "folder": ("root", "/path/to/train (ImageNet layout: one subfolder per class)"),
    "latents": ("root", "/path/to/latents (written by scripts/extract_latents.py)"),
    "cifar10": ("root", "/path/to/cifar10 (torchvision downloads CIFAR-10 there with data.download=true)"),
}
# pip names of accelerate's trackers where they differ from the tracker name.
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


# ----------------------------------------------------------------------------------------------------------
# The config, checked before any work


def model_kwargs(model: DictConfig | dict) -> tuple[str, dict]:
    """The backbone (`model.backbone`: uvit, the default, or dit) and its builder's arguments for a `model` group:
    its preset's sizes (model.PRESETS, dit.DIT_PRESETS: the one place they live) under the fields the config sets;
    a field left null takes the preset's value (`uvit_cog.backbones.backbone_arguments`)."""
    fields = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    try:
        return backbone_arguments(fields)
    except ValueError as e:
        raise ValueError(f"model.{e}") from e


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The model the config describes, freshly initialised."""
    name, kwargs = model_kwargs(cfg.model)
    return build_backbone(name, **kwargs)


def validate_config(cfg: DictConfig, num_processes: int) -> None:
    """Stop before any work on a config that cannot train, naming the field and the fix."""
    t = cfg.train
    per_step = num_processes * t.grad_accum
    if t.batch_size <= 0 or t.grad_accum <= 0 or t.batch_size % per_step:
        raise ValueError(
            f"train.batch_size={t.batch_size} (the global batch) must be a positive multiple of "
            f"processes × train.grad_accum = {num_processes} × {t.grad_accum} = {per_step}: "
            f"set train.batch_size to a multiple of {per_step} or change train.grad_accum"
        )
    if t.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision={t.mixed_precision!r}: choose one of {MIXED_PRECISION}")
    if t.nonfinite not in NONFINITE:
        raise ValueError(f"train.nonfinite={t.nonfinite!r}: choose one of {NONFINITE}")
    if t.steps <= 0:
        raise ValueError(f"train.steps={t.steps}: set a positive number of optimiser steps")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={t.ema_decay}: must be in [0, 1), e.g. 0.9999")
    if not 0.0 <= t.label_dropout < 1.0:
        raise ValueError(f"train.label_dropout={t.label_dropout}: must be in [0, 1), e.g. 0.1")
    if t.label_dropout > 0 and cfg.model.num_classes == 0:
        raise ValueError("train.label_dropout > 0 needs a class-conditional model: set train.label_dropout=0 "
                         "or model.num_classes=data.num_classes")
    if cfg.log.keep_checkpoints < 1:
        raise ValueError(f"log.keep_checkpoints={cfg.log.keep_checkpoints}: keep at least 1")
    try:
        diffusion_setup(cfg)  # an unknown objective, schedule, prediction type, t sampling or weighting
    except ValueError as e:
        raise ValueError(f"diffusion: {e}") from e
    for group in ("sample", "fid"):
        if cfg.model.num_classes == 0 and cfg[group].guidance != 1.0:
            raise ValueError(f"{group}.guidance must be 1.0 for an unconditional model "
                             "(classifier-free guidance needs class labels)")
        try:
            check_scheduler(cfg[group].scheduler, cfg.diffusion.objective)
        except ValueError as e:
            raise ValueError(f"{group}.scheduler={cfg[group].scheduler!r}: {e}") from e
    _validate_val(cfg)
    if cfg.diffusion.clip_sample and cfg.data.kind == "latents":
        raise ValueError("diffusion.clip_sample=true clips to [-1, 1], which latents are not bounded by: "
                         "set diffusion.clip_sample=false for latent models")
    _validate_data(cfg)
    _validate_model(cfg)
    _validate_trackers(cfg)
    if cfg.fid.every > 0 and not cfg.fid.reference:
        raise ValueError("fid.every > 0 needs fid.reference=<statistics .npz, image folder or .npz of the data> "
                         "(or set fid.every=0)")
    if cfg.resume not in ("auto", "never") and not (Path(cfg.resume) / TRAIN_STATE).is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: not a checkpoint (no {TRAIN_STATE}); use resume=auto, resume=never or a "
            "path like RUN/checkpoints/step_0010000"
        )
    check_run_dir(cfg.run_dir)
    _validate_same_model(cfg)


def diffusion_setup(cfg: DictConfig) -> tuple[dict, Objective]:
    """The `diffusion` group as (the scheduler config exported with the model, the training objective)."""
    d = cfg.diffusion
    schedule = scheduler_config(d.schedule, d.prediction_type, d.num_train_timesteps, d.clip_sample,
                                objective=d.objective, shift=d.shift)
    return schedule, make_objective(schedule, t_sampling=d.t_sampling, logit_mean=d.logit_mean,
                                    logit_std=d.logit_std, loss_weighting=d.loss_weighting, snr_gamma=d.snr_gamma)


def validation_runs(cfg: DictConfig) -> bool:
    """Whether this run computes the validation loss at all (every `val.every` steps, within `train.steps`)."""
    return 0 < cfg.val.every <= cfg.train.steps


def _validate_val(cfg: DictConfig) -> None:
    v, split, holdout = cfg.val, cfg.data.get("val_split", "test"), cfg.data.get("holdout", 0)
    if v.every < 0:
        raise ValueError(f"val.every={v.every}: steps between validation losses, or 0 for none")
    for field in ("num_images", "num_timesteps", "batch_size"):
        if v[field] <= 0:
            raise ValueError(f"val.{field}={v[field]} must be positive")
    if split not in VAL_SPLITS:
        raise ValueError(f"data.val_split={split!r}: choose one of {VAL_SPLITS}")
    if holdout < 0:
        raise ValueError(f"data.holdout={holdout}: the number of items held out of training, >= 0")
    if not validation_runs(cfg):
        return
    if split == "holdout" and holdout < v.num_images:
        raise ValueError(f"val.num_images={v.num_images} but data.holdout={holdout} items are held out of training: "
                         f"set data.holdout >= {v.num_images}, lower val.num_images, or set val.every=0")
    if split == "test" and cfg.data.kind not in ("cifar10", "npz"):
        raise ValueError(f"data={cfg.data.kind} has no test split for the validation loss: set data.val_split=holdout "
                         f"and data.holdout=N (N >= val.num_images={v.num_images} items held out of training), or "
                         "val.every=0")


def _validate_data(cfg: DictConfig) -> None:
    kind = cfg.data.kind
    if kind not in DATA_KINDS:
        raise ValueError(f"data.kind={kind!r}: choose one of {DATA_KINDS}")
    if kind not in DATA_PATHS:
        return
    field, what = DATA_PATHS[kind]
    if OmegaConf.is_missing(cfg.data, field) or not cfg.data[field]:
        raise ValueError(f"data.{field} is not set: data={kind} needs data.{field}={what}")
    if not Path(cfg.data[field]).exists() and not (kind == "cifar10" and cfg.data.download):
        raise FileNotFoundError(f"data.{field}={cfg.data[field]} does not exist: set data.{field}={what}")


def _validate_model(cfg: DictConfig) -> None:
    m, d = cfg.model, cfg.data
    backbone, kwargs = model_kwargs(m)  # an unknown backbone or preset
    if backbone == "dit" and kwargs.get("learn_sigma"):
        raise ValueError("model.learn_sigma=true: DiT's learned variance is trained by its hybrid loss (L_simple + "
                         "the variational bound), which this toolkit does not implement; its losses and samplers use "
                         "fixed variances: set model.learn_sigma=false")
    for field, data_field in (("sample_size", "resolution"), ("in_channels", "channels")):
        if m[field] != d[data_field]:
            raise ValueError(
                f"model.{field}={m[field]} but data.{data_field}={d[data_field]}: they must agree "
                f"(drop the model.{field} override or set model.{field}={d[data_field]})"
            )
    if m.num_classes not in (0, d.num_classes):
        raise ValueError(
            f"model.num_classes={m.num_classes} but the data has {d.num_classes} classes: "
            f"set model.num_classes={d.num_classes} (class-conditional) or 0 (unconditional)"
        )


def _validate_trackers(cfg: DictConfig) -> None:
    """Every `log.trackers` entry is one of accelerate's trackers and its package is installed."""
    imports = importlib.import_module("accelerate.utils.imports")
    for name in cfg.log.trackers:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"log.trackers: unknown tracker {name!r}; accelerate supports "
                             f"{sorted(LOGGER_TYPE_TO_CLASS)}")
        if not getattr(imports, f"is_{name}_available")():
            package = TRACKER_PACKAGES.get(name, name)
            raise ModuleNotFoundError(f"log.trackers includes {name!r} but its package is not installed: "
                                      f"pip install {package}  (or drop it from log.trackers)")


def _validate_same_model(cfg: DictConfig) -> None:
    """Refuse to resume a run directory that holds another model (compared as built, presets resolved)."""
    saved = read_config(cfg.run_dir)
    if saved is None or cfg.resume == "never" or "model" not in saved:
        return
    (old_backbone, old), (new_backbone, new) = model_kwargs(saved["model"]), model_kwargs(cfg.model)
    old, new = {"backbone": old_backbone, **old}, {"backbone": new_backbone, **new}
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
        raise ValueError(f"run_dir={cfg.run_dir} holds a run of another model (saved, now: {diff}): set another "
                         "run_dir, or restore the model settings to resume it")


def keep_saved_data_split(cfg: DictConfig) -> None:
    """A resumed run keeps the training set it started with (`data.val_split`, `data.holdout`).

    A run started before held-out splits existed trained on every item: it resumes with `data.holdout=0` (noted
    in the log), and cannot then validate on a holdout. Changing the split of a started run is refused.
    """
    saved = read_config(cfg.run_dir)
    if saved is None or cfg.resume == "never" or "data" not in saved:
        return
    old, new = saved["data"], cfg.data
    if "holdout" not in old:
        if new.get("val_split") == "holdout" and new.get("holdout"):
            print(f"run_dir={cfg.run_dir} was started before held-out splits, on all of its data: resuming with "
                  "data.holdout=0")
            OmegaConf.update(cfg, "data.holdout", 0, force_add=True)
            if validation_runs(cfg):
                raise ValueError(f"run_dir={cfg.run_dir} trained on all of data={new.kind}, so none is held out for "
                                 "the validation loss: resume it with val.every=0, or start another run_dir")
        return
    for field in ("val_split", "holdout"):
        if old.get(field) != new.get(field):
            raise ValueError(f"run_dir={cfg.run_dir} was started with data.{field}={old.get(field)}; resuming with "
                             f"{new.get(field)} would change its training set: set data.{field}={old.get(field)} "
                             "or another run_dir")


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create `run_dir` and prove it writable, or raise a ValueError that says to pick another."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"run_dir={run_dir} cannot be written ({e}): set run_dir=<a writable folder>") from e
    return path


def tracker_config(cfg: DictConfig) -> dict:
    """The resolved config flattened to `a.b.c: scalar`, the form every tracker's hyper-parameter table takes."""
    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value if isinstance(value, int | float | str | bool) else str(value)
    return dict(flatten(OmegaConf.to_container(cfg, resolve=True)))


# ----------------------------------------------------------------------------------------------------------
# Training


def train(cfg: DictConfig) -> Path:
    """Train from a composed config and return the run directory."""
    keep_saved_data_split(cfg)
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
    accelerator.wait_for_everyone()  # the main process has recovered the run before any rank looks at it
    resume_from = select_checkpoint(run_dir, cfg.resume, log=accelerator.print)
    accelerator.wait_for_everyone()  # every rank has chosen its checkpoint before the main process writes
    if accelerator.is_main_process:
        write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))

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

    def checkpoint() -> None:
        check_ranks_in_sync(accelerator, model=accelerator.unwrap_model(model), ema=ema)
        train_state = {"step": step, "images_seen": images_seen, "processes": world, "skipped_steps": skipped}
        save_checkpoint(accelerator, run_dir, step, train_state,
                        lambda out: export_pipeline(ema, noise_schedule, vae, out), cfg.log.keep_checkpoints)

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
