"""The reusable pieces of `train.py`: config checks, the loss, EMA, atomic checkpoints, resume, metrics.

Run directory (`run_dir`):

    config.yaml                        the resolved config of the latest (re)start
    metrics.jsonl                      one JSON record per logging step (and per FID evaluation)
    samples/step_XXXXXXX.png           sample grids of the EMA model from fixed seeds
    checkpoints/step_XXXXXXX/          accelerate state (model, optimiser, LR schedule, RNG, EMA),
                                       train_state.json (step, data position) and pipeline/ (the EMA export)
    pipeline/                          the final EMA model as a `UViTPipeline` directory
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from .data import DATA_KINDS
from .pipeline import UViTPipeline
from .rundir import checkpoint_step
from .sampling import generate_samples, sample_grid
from .schedule import SCHEDULERS, sample_timesteps, scheduler_config, training_target

TRAIN_STATE = "train_state.json"
MIXED_PRECISION = ("no", "bf16", "fp16")
# The path field each data kind needs, and what it should point at (for the error message).
DATA_PATHS = {
    "npz": ("path", "/path/to/images.npz (uint8 NHWC arrays x_train/y_train, or ADM's arr_0)"),
    "folder": ("root", "/path/to/train (ImageNet layout: one subfolder per class)"),
    "latents": ("root", "/path/to/latents (written by scripts/extract_latents.py)"),
    "cifar10": ("root", "/path/to/cifar10 (torchvision downloads CIFAR-10 there with data.download=true)"),
}


# ----------------------------------------------------------------------------------------------------------
# Config checks


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
    if cfg.model.num_classes == 0 and (cfg.sample.guidance, cfg.fid.guidance) != (1.0, 1.0):
        raise ValueError("sample.guidance and fid.guidance must be 1.0 for an unconditional model "
                         "(classifier-free guidance needs class labels)")
    if cfg.sample.scheduler not in SCHEDULERS:
        raise ValueError(f"sample.scheduler={cfg.sample.scheduler!r}: choose one of {sorted(SCHEDULERS)}")
    scheduler_config(**cfg.diffusion)  # raises on an unknown schedule or prediction type
    if cfg.diffusion.clip_sample and cfg.data.kind == "latents":
        raise ValueError("diffusion.clip_sample=true clips to [-1, 1], which latents are not bounded by: "
                         "set diffusion.clip_sample=false for latent models")
    _validate_data(cfg)
    _validate_model(cfg)
    if cfg.fid.every > 0 and not cfg.fid.reference:
        raise ValueError("fid.every > 0 needs fid.reference=<statistics .npz, image folder or .npz of the data> "
                         "(or set fid.every=0)")
    if cfg.resume not in ("auto", "never") and not (Path(cfg.resume) / TRAIN_STATE).is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: not a checkpoint (no {TRAIN_STATE}); use resume=auto, resume=never or a "
            "path like RUN/checkpoints/step_0010000"
        )
    check_run_dir(cfg.run_dir)


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


# ----------------------------------------------------------------------------------------------------------
# Randomness, loss and EMA


class GlobalBatchRandom:
    """Random draws for a whole global batch, of which this micro-batch on this rank takes rows
    `offset : offset + local_batch`.

    Seeded by (seed, step) only, so a step's noise, timesteps, flips and label drops depend on neither the
    number of processes, nor gradient accumulation, nor restarts: a resumed, accumulated or multi-process
    run reproduces a single-process uninterrupted one up to floating-point reduction order.
    """

    def __init__(self, seed: int, step: int, offset: int, local_batch: int, global_batch: int,
                 device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(hash((int(seed), int(step))) & (2**63 - 1))
        self.device, self.total, self.rows = device, global_batch, slice(offset, offset + local_batch)

    def rand(self) -> Tensor:
        """(local_batch,) uniform numbers in [0, 1)."""
        return torch.rand(self.total, generator=self.generator, device=self.device)[self.rows]

    def randn(self, *shape: int) -> Tensor:
        """(local_batch, *shape) standard normal numbers."""
        return torch.randn(self.total, *shape, generator=self.generator, device=self.device)[self.rows]

    def timesteps(self, num_train_timesteps: int) -> Tensor:
        """(local_batch,) training timesteps, drawn as `uvit_cog.schedule.sample_timesteps` defines."""
        return sample_timesteps(self.total, num_train_timesteps, self.generator, self.device)[self.rows]


def diffusion_loss(model: nn.Module, noise_scheduler: DDPMScheduler, x0: Tensor, class_labels: Tensor | None,
                   rnd: GlobalBatchRandom) -> Tensor:
    """The mean squared error of the model's prediction of the target that the scheduler config defines."""
    t = rnd.timesteps(noise_scheduler.config.num_train_timesteps)
    noise = rnd.randn(*x0.shape[1:]).to(x0.dtype)
    xt = noise_scheduler.add_noise(x0, noise, t)
    target = training_target(noise_scheduler, x0, noise, t)
    pred = model(xt, t, class_labels=class_labels).sample
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter (same on every rank: params agree)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of optimiser step `step` (1-based): `decay`, or with warm-up min(decay, (1+step)/(10+step)).

    Without warm-up a decay d keeps d^step of the random initial weights (37% after 1,000 steps at
    d = 0.999), which ruins the EMA of short runs; the warm-up is diffusers' `EMAModel` default.
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def model_fingerprint(*modules: nn.Module) -> Tensor:
    """(sum, sum of squares) of each parameter tensor in float64: equal prints mean (almost surely) equal weights."""
    return torch.stack([
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
        for m in modules for p in m.parameters()
    ]).flatten()


def check_ranks_in_sync(accelerator: Accelerator, **modules: nn.Module) -> None:
    """Raise if any rank's weights differ from rank 0's (every rank must call this)."""
    for name, module in modules.items():
        prints = accelerator.gather(model_fingerprint(module)[None])
        if not torch.equal(prints, prints[:1].expand_as(prints)):
            raise RuntimeError(f"{name} weights differ between processes: the ranks have diverged")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a directory is complete once renamed into place)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if checkpoint_step(p) >= 0 and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: `resume=auto` → the latest in run_dir (None if none), a path → itself.

    Refuses to start over a run that has checkpoints (`resume=never`) or to resume one whose model differs.
    """
    found = list_checkpoints(cfg.run_dir)
    if cfg.resume == "never":
        if found:
            raise ValueError(f"run_dir={cfg.run_dir} already has checkpoints (latest {found[-1].name}): use "
                             "resume=auto to continue it or set another run_dir")
        return None
    if cfg.resume == "auto":
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(cfg.resume)
    saved = Path(cfg.run_dir) / "config.yaml"
    if saved.is_file():
        old = OmegaConf.to_container(OmegaConf.load(saved).get("model", {}))
        new = OmegaConf.to_container(cfg.model, resolve=True)
        if old != new:
            raise ValueError(f"run_dir={cfg.run_dir} holds a run of another model ({old}, now {new}): set "
                             "another run_dir, or restore the model settings to resume it")
    return path


def commit_checkpoint(tmp: Path, final: Path) -> None:
    """Move a fully written checkpoint into place with a rename: readers see all of it or none of it."""
    if final.exists():  # the same step saved again (e.g. after resuming from an older checkpoint)
        old = final.with_name(f".old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, step: int, train_state: Mapping,
                    export: Callable[[Path], None], keep: int) -> Path:
    """Save an atomic checkpoint `checkpoints/step_XXXXXXX` and keep the newest `keep`.

    Every rank calls this (DeepSpeed and FSDP save collectively); the main process writes the train
    state and the pipeline export into a temporary directory, renames it into place, and prunes.
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        export(tmp / "pipeline")
        (tmp / TRAIN_STATE).write_text(json.dumps(dict(train_state), indent=1))
        commit_checkpoint(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete temporary directories left by a save that was interrupted (main process, before training)."""
    for tmp in (Path(run_dir) / "checkpoints").glob(".*_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict:
    """Restore model, optimiser, LR schedule, RNG states and registered objects (the EMA); return the train state."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / TRAIN_STATE).read_text())


def export_pipeline(transformer: nn.Module, noise_schedule: Mapping, vae: nn.Module | None,
                    out_dir: str | os.PathLike) -> UViTPipeline:
    """Save `transformer` (the EMA model) with its training noise schedule (and VAE) as a `UViTPipeline`."""
    pipeline = UViTPipeline(transformer=transformer, scheduler=DDPMScheduler.from_config(dict(noise_schedule)),
                            vae=vae)
    pipeline.save_pretrained(out_dir)
    return pipeline


def export_final_pipeline(transformer: nn.Module, noise_schedule: Mapping, vae: nn.Module | None,
                          run_dir: str | os.PathLike) -> Path:
    """Write `RUN/pipeline` atomically: a temporary directory renamed into place."""
    final = Path(run_dir) / "pipeline"
    tmp = final.with_name(".tmp_pipeline")
    shutil.rmtree(tmp, ignore_errors=True)
    export_pipeline(transformer, noise_schedule, vae, tmp)
    commit_checkpoint(tmp, final)
    return final


def save_sample_grid(pipeline: UViTPipeline, sample: Mapping, path: str | os.PathLike) -> Path:
    """A grid from fixed seeds (`uvit_cog.sampling.sample_grid`: one row per class if conditional), as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(pipeline, n=sample["grid_size"], seed=sample["seed"], num_inference_steps=sample["steps"],
                       guidance_scale=sample["guidance"], scheduler=sample["scheduler"],
                       batch_size=sample["batch_size"])
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def evaluate_fid(accelerator: Accelerator, pipeline: UViTPipeline, fid: Mapping, sample: Mapping,
                 folder: str | os.PathLike) -> float | None:
    """FID of `fid.num_images` samples against `fid.reference`, sampled on all ranks; the value on the main process."""
    from .metrics import compute_metrics

    generate_samples(pipeline, folder, fid["num_images"], batch_size=sample["batch_size"], seed=fid["seed"],
                     num_inference_steps=fid["steps"], guidance_scale=fid["guidance"],
                     scheduler=sample["scheduler"], accelerator=accelerator)
    value = None
    if accelerator.is_main_process:
        record = compute_metrics(folder, fid["reference"], metrics=("fid",), weights=fid["weights"],
                                 device=str(accelerator.device), progress=False)
        value = float(record["metrics"]["frechet_inception_distance"])
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return value


# ----------------------------------------------------------------------------------------------------------
# Run directory and metrics


def write_config(cfg: DictConfig, run_dir: str | os.PathLike) -> None:
    """Write the resolved config to `RUN/config.yaml` (main process)."""
    (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


class MetricsLogger:
    """Appends one JSON record per line to `RUN/metrics.jsonl`, and optionally to TensorBoard (`RUN/tensorboard`).

    Only the main process writes. On resume, records after the resumed step (written by the run that
    died after its last checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        if self.path.exists():
            records = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in records if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: Mapping) -> None:
        """Write a record with a "step" key; numbers other than step also go to TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record)) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
