"""train.py's config: checked before any work, and turned into the explicit arguments the library takes.

Every check names the field that is wrong and how to fix it, so a bad override stops in a second instead of
after the data has loaded (or, worse, after the first checkpoint). This module and train.py are the only
places that read the Hydra config (conf/train.yaml and its groups); bench/val_cost.py builds its model and
objective through it so that it measures what training builds.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from omegaconf import DictConfig, OmegaConf

from uvit_cog.backbones import backbone_arguments, build_backbone, condition_kind, with_defaults
from uvit_cog.checkpoints import TRAIN_STATE
from uvit_cog.data import DATA_KINDS, VAL_SPLITS
from uvit_cog.rundir import read_config
from uvit_cog.schedule import Objective, check_scheduler, make_objective, scheduler_config

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


def model_kwargs(model: DictConfig | dict) -> tuple[str, dict]:
    """The backbone (`model.backbone`: uvit, the default, or dit) and its builder's arguments for a `model` group:
    its preset's sizes (model.PRESETS, dit.DIT_PRESETS: the one place they live) under the fields the config sets;
    a field left null takes the preset's value (`uvit_cog.backbones.backbone_arguments`)."""
    fields = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    try:
        return backbone_arguments(fields)
    except ValueError as e:
        raise ValueError(f"model.{e}") from e


def model_condition(cfg: DictConfig) -> str:
    """The condition kind ("none", "class", "text") of the config's model (`uvit_cog.backbones.condition_kind`)."""
    return condition_kind(model_kwargs(cfg.model)[1])


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
    if not 0.0 <= t.condition_dropout < 1.0:
        raise ValueError(f"train.condition_dropout={t.condition_dropout}: must be in [0, 1), e.g. 0.1")
    kind = model_condition(cfg)
    if t.condition_dropout > 0 and kind == "none":
        raise ValueError("train.condition_dropout > 0 needs a conditional model (classes or text): set "
                         "train.condition_dropout=0, or model.num_classes=data.num_classes")
    if cfg.log.keep_checkpoints < 1:
        raise ValueError(f"log.keep_checkpoints={cfg.log.keep_checkpoints}: keep at least 1")
    try:
        diffusion_setup(cfg)  # an unknown objective, schedule, prediction type, t sampling or weighting
    except ValueError as e:
        raise ValueError(f"diffusion: {e}") from e
    for group in ("sample", "fid"):
        if kind == "none" and cfg[group].guidance != 1.0:
            raise ValueError(f"{group}.guidance must be 1.0 for an unconditional model "
                             "(classifier-free guidance needs class labels or text)")
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
    has_test = cfg.data.kind in ("cifar10", "npz") or (cfg.data.kind == "latents" and cfg.data.get("val_root")) or (
        cfg.data.kind == "captions" and cfg.data.get("format") == "coco")
    if split == "test" and not has_test:
        raise ValueError(f"data={cfg.data.kind} has no test split for the validation loss (latents: data.val_root; "
                         "MS-COCO: val2014): set data.val_split=holdout "
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


def check_resumed_run(cfg: DictConfig) -> None:
    """A run directory that already holds a run resumes only the same model, on the same training set.

    The model is compared as built (presets resolved). The training set (`data.val_split`, `data.holdout`) is
    kept: a run started before held-out splits existed trained on every item, so it resumes with `data.holdout=0`
    (noted in the log) and cannot then validate on a holdout. Changing the split of a started run is refused.
    Call it before `validate_config`, which then checks the split the run really has.
    """
    saved = read_config(cfg.run_dir)
    if saved is None or cfg.resume == "never":
        return
    if "model" in saved:
        _check_same_model(cfg, saved["model"])
    if "data" in saved:
        _keep_data_split(cfg, saved["data"])


def _check_same_model(cfg: DictConfig, saved: dict) -> None:
    (old_backbone, old), (new_backbone, new) = model_kwargs(saved), model_kwargs(cfg.model)
    # Arguments added since the run started (e.g. text_dim) compare at their defaults: the same model.
    old = {"backbone": old_backbone, **with_defaults(old_backbone, old)}
    new = {"backbone": new_backbone, **with_defaults(new_backbone, new)}
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
        raise ValueError(f"run_dir={cfg.run_dir} holds a run of another model (saved, now: {diff}): set another "
                         "run_dir, or restore the model settings to resume it")


def _keep_data_split(cfg: DictConfig, old: dict) -> None:
    new = cfg.data
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
