"""train.py's config: checked before any work, and turned into the explicit arguments the library takes.

Every check names the field that is wrong, its value and how to fix it, so a bad override stops in a second instead
of after the data has loaded (or, worse, after the first checkpoint): every number by `CONFIG_CHECKS` (type, range,
finiteness), every name against its registry, then the relations between fields. This module and train.py are the
only places that read the Hydra config (conf/train.yaml and its groups); bench/val_cost.py builds its model and
objective through it so that it measures what training builds.

Provenance: each checkpoint records the settings that define its training (`training_definition`: the keys under
`DEFINES_TRAINING`, resolved as the library builds them), and a resume whose config changes any of them is refused
listing the differences (`check_resume`) unless `allow_resume_changes` names them; the accepted changes are
recorded in every later checkpoint. The settings under `MAY_CHANGE_ON_RESUME` (steps, logging, sampling,
validation, FID) may change freely.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from diffusers.optimization import SchedulerType
from omegaconf import DictConfig, OmegaConf

from uvit_cog.attention import ATTENTION_KINDS
from uvit_cog.backbones import backbone_arguments, build_backbone, condition_kind, with_defaults
from uvit_cog.checkpoints import PROVENANCE_FORMAT, TRAIN_STATE, list_checkpoints, read_provenance
from uvit_cog.checks import SEED, Bool, Check, Choice, Float, Int, check_fields, fail
from uvit_cog.data import DATA_KINDS, VAL_SPLITS
from uvit_cog.metrics import check_reference
from uvit_cog.objectives import Objective, make_objective
from uvit_cog.provenance import describe_differences, differences, flatten
from uvit_cog.rundir import checkpoint_step, read_config
from uvit_cog.schedule import NOISE_SCHEDULES, check_scheduler, scheduler_config, scheduler_family

MIXED_PRECISION = ("no", "bf16", "fp16")
NONFINITE = ("skip", "stop")
LR_SCHEDULES = tuple(t.value for t in SchedulerType)  # diffusers.optimization.get_scheduler's names
POSITIVE, COUNT, ABOVE_ZERO, FRACTION = Int(1), Int(0), Float(0, low_open=True), Float(0, 1, high_open=True)
# Every number and switch of conf/train.yaml and its groups: checked first, each naming the field, the value and
# the range (uvit_cog.checks). A key a data group lacks is skipped. Names and relations are checked after.
CONFIG_CHECKS: dict[str, Check] = {
    "seed": SEED,
    "train.steps": POSITIVE, "train.batch_size": POSITIVE, "train.grad_accum": POSITIVE,
    "train.mixed_precision": Choice(MIXED_PRECISION), "train.nonfinite": Choice(NONFINITE),
    "train.max_grad_norm": Float(0, low_open=True, optional=True), "train.ema_decay": FRACTION,
    "train.ema_warmup": Bool(), "train.condition_dropout": FRACTION, "train.compile": Bool(),
    "train.gradient_checkpointing": Bool(), "train.cpu": Bool(),
    "optim.lr": ABOVE_ZERO, "optim.weight_decay": Float(0), "optim.eps": ABOVE_ZERO,
    "optim.warmup_steps": COUNT, "optim.lr_schedule": Choice(LR_SCHEDULES),
    "log.every": POSITIVE, "log.sample_every": COUNT, "log.checkpoint_every": COUNT, "log.keep_checkpoints": POSITIVE,
    "sample.grid_size": POSITIVE, "sample.steps": POSITIVE, "sample.guidance": Float(), "sample.seed": SEED,
    "sample.batch_size": POSITIVE,
    "val.every": COUNT, "val.num_images": POSITIVE, "val.num_timesteps": POSITIVE, "val.seed": SEED,
    "val.batch_size": POSITIVE, "val.ema": Bool(),
    "fid.every": COUNT, "fid.num_images": Int(2), "fid.steps": POSITIVE, "fid.guidance": Float(), "fid.seed": SEED,
    "fid.batch_size": POSITIVE,
    "diffusion.num_train_timesteps": Int(2), "diffusion.clip_sample": Bool(), "diffusion.shift": ABOVE_ZERO,
    "diffusion.logit_mean": Float(), "diffusion.logit_std": ABOVE_ZERO, "diffusion.snr_gamma": ABOVE_ZERO,
    "data.resolution": POSITIVE, "data.channels": POSITIVE, "data.num_classes": COUNT, "data.hflip": Bool(),
    "data.max_images": Int(1, optional=True), "data.num_workers": COUNT, "data.holdout": COUNT,
    "data.download": Bool(), "data.scale_factor": ABOVE_ZERO, "data.text_dim": COUNT, "data.num_text_tokens": POSITIVE,
}
# The model's sizes, checked as built (presets resolved): `_validate_model`.
MODEL_CHECKS: dict[str, Check] = {
    "sample_size": POSITIVE, "in_channels": POSITIVE, "num_classes": COUNT, "patch_size": POSITIVE,
    "embed_dim": POSITIVE, "hidden_size": POSITIVE, "depth": POSITIVE, "num_heads": POSITIVE,
    "mlp_ratio": ABOVE_ZERO, "attention_type": Choice(ATTENTION_KINDS), "text_dim": COUNT,
    "num_text_tokens": POSITIVE, "timestep_offset": Float(), "timestep_scale": ABOVE_ZERO,
}
# What defines a training run (keys of conf/train.yaml; a group stands for every key in it), compared on resume.
# A new field inside these groups is covered as it appears; a new top-level field goes in one list or the other
# (tests/test_provenance.py checks that every key of every experiment is in one of them).
DEFINES_TRAINING = ("model", "diffusion", "data", "optim", "seed", "train.batch_size", "train.mixed_precision",
                    "train.max_grad_norm", "train.ema_decay", "train.ema_warmup", "train.condition_dropout")
# What may change when a run resumes: how long it trains, how it runs, what it logs, samples and measures. With a
# decaying optim.lr_schedule the remaining rates follow a changed train.steps.
MAY_CHANGE_ON_RESUME = ("name", "run_dir", "resume", "allow_resume_changes", "train.steps", "train.grad_accum",
                        "train.nonfinite", "train.compile", "train.gradient_checkpointing", "train.cpu", "log",
                        "sample", "val", "fid", "data.num_workers", "data.download")
# The path field each data kind needs, and what it should point at (for the error message).
DATA_PATHS = {
    "npz": ("path", "/path/to/images.npz (uint8 NHWC arrays x_train/y_train, or ADM's arr_0)"),
    "folder": ("root", "/path/to/train (ImageNet layout: one subfolder per class)"),
    "latents": ("root", "/path/to/latents (written by scripts/extract_latents.py)"),
    "cifar10": ("root", "/path/to/cifar10 (torchvision downloads CIFAR-10 there with data.download=true)"),
    "captions": ("root", "/path/to/coco (train2014/, val2014/, annotations/) or a folder with a metadata.jsonl"),
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
    """Stop before any work on a config that cannot train, naming the field, the value and the fix.

    A run directory started before held-out splits keeps training on all its data (`keep_legacy_split`, which may
    set `data.holdout=0`); the checks below see the split the run really has.
    """
    check_fields(OmegaConf.to_container(cfg, resolve=True), CONFIG_CHECKS)
    keep_legacy_split(cfg)
    t = cfg.train
    per_step = num_processes * t.grad_accum
    if t.batch_size % per_step:
        raise ValueError(
            f"train.batch_size={t.batch_size} (the global batch) must be a positive multiple of "
            f"processes × train.grad_accum = {num_processes} × {t.grad_accum} = {per_step}: "
            f"set train.batch_size to a multiple of {per_step} or change train.grad_accum"
        )
    _validate_optim(cfg)
    kind = model_condition(cfg)
    if t.condition_dropout > 0 and kind == "none":
        raise ValueError("train.condition_dropout > 0 needs a conditional model (classes or text): set "
                         "train.condition_dropout=0, or model.num_classes=data.num_classes")
    try:
        diffusion_setup(cfg)  # an unknown objective, schedule, prediction type, t sampling or weighting
    except ValueError as e:
        raise ValueError(f"diffusion: {e}") from e
    for group in ("sample", "fid"):
        if kind == "none" and cfg[group].guidance != 1.0:
            raise ValueError(f"{group}.guidance={cfg[group].guidance} must be 1.0 for an unconditional model "
                             "(classifier-free guidance needs class labels or text)")
        try:
            prediction = diffusion_setup(cfg)[0].get("prediction_type")
            check_scheduler(cfg[group].scheduler, cfg.diffusion.objective, prediction)
        except ValueError as e:
            raise ValueError(f"{group}.scheduler={cfg[group].scheduler!r}: {e}") from e
    _validate_val(cfg)
    if cfg.diffusion.clip_sample and cfg.data.kind == "latents":
        raise ValueError("diffusion.clip_sample=true clips to [-1, 1], which latents are not bounded by: "
                         "set diffusion.clip_sample=false for latent models")
    _validate_data(cfg)
    _validate_model(cfg)
    _validate_trackers(cfg)
    if cfg.fid.every > 0:
        if (kind == "text") != bool(cfg.fid.get("prompts_file")):
            raise ValueError("fid.prompts_file: a text-to-image model's FID samples image i from prompt i of a file "
                             "(one a line): set it for text models, and only for them (or set fid.every=0)")
        if not cfg.fid.reference:
            raise ValueError("fid.every > 0 needs fid.reference=<statistics .npz, image folder or .npz of the data> "
                             "(or set fid.every=0)")
        try:
            check_reference(cfg.fid.reference)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"fid.reference: {e}") from e
    if cfg.resume not in ("auto", "never") and not (Path(cfg.resume) / TRAIN_STATE).is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: not a checkpoint (no {TRAIN_STATE}); use resume=auto, resume=never or a "
            "path like RUN/checkpoints/step_0010000"
        )
    _validate_allowed_changes(cfg)
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


def _validate_optim(cfg: DictConfig) -> None:
    betas = cfg.optim.betas
    if not OmegaConf.is_list(betas) or len(betas) != 2:
        raise fail("optim.betas", betas, "not a pair", "give AdamW's two decay rates, e.g. optim.betas=[0.9,0.999]")
    for i, beta in enumerate(betas):
        Float(0, 1, high_open=True)(f"optim.betas[{i}]", beta)


def _validate_val(cfg: DictConfig) -> None:
    v, split, holdout = cfg.val, cfg.data.get("val_split", "test"), cfg.data.get("holdout", 0)
    if split not in VAL_SPLITS:
        raise ValueError(f"data.val_split={split!r}: choose one of {VAL_SPLITS}")
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
    check_fields(kwargs, {k: check for k, check in MODEL_CHECKS.items() if k in kwargs})
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
    try:
        with torch.device("meta"):  # sizes that do not fit together (heads, patches), without allocating weights
            build_backbone(backbone, **kwargs)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise ValueError(f"model: these model.* settings build no {backbone} model: {e}") from e


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


def keep_legacy_split(cfg: DictConfig) -> None:
    """A run started before held-out splits existed trained on every item: it resumes with `data.holdout=0`
    (noted in the log) and cannot then validate on a holdout. Runs of this format record their split (and all else
    that defines them) in their checkpoints instead: `check_resume`."""
    saved = read_config(cfg.run_dir) if cfg.resume != "never" and list_checkpoints(cfg.run_dir) else None
    old = (saved or {}).get("data")
    if old is None or "holdout" in old:
        return
    new = cfg.data
    if new.get("val_split") == "holdout" and new.get("holdout"):
        print(f"run_dir={cfg.run_dir} was started before held-out splits, on all of its data: resuming with "
              "data.holdout=0")
        OmegaConf.update(cfg, "data.holdout", 0, force_add=True)
        if validation_runs(cfg):
            raise ValueError(f"run_dir={cfg.run_dir} trained on all of data={new.kind}, so none is held out for "
                             "the validation loss: resume it with val.every=0, or start another run_dir")


def covered(key: str, prefixes: Sequence[str]) -> bool:
    """Whether dotted `key` is one of `prefixes` or inside one of them (a group)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _resolved_diffusion(d: Mapping) -> dict:
    """The diffusion group with its defaults resolved as `scheduler_config` resolves them (null schedule and
    prediction type), so that `schedule: null` and `schedule: linear` compare equal; the objective is the one the
    schedule belongs to (runs saved before objectives existed are DDPM runs)."""
    args = ("schedule", "prediction_type", "num_train_timesteps", "clip_sample", "objective", "shift")
    try:
        schedule = scheduler_config(**{k: d[k] for k in args if k in d})
    except (ValueError, TypeError):  # refused by validate_config; a saved record keeps its values as they were
        return dict(d)
    noise = next((name for name, keys in NOISE_SCHEDULES.items() if keys.items() <= schedule.items()), None)
    return {**d, "objective": scheduler_family(schedule), "schedule": noise,
            "prediction_type": schedule["prediction_type"]}


def training_definition(config: Mapping) -> dict[str, Any]:
    """The settings that define a training run, as flat dotted keys: every key under `DEFINES_TRAINING` but those
    under `MAY_CHANGE_ON_RESUME`, the model as built (preset sizes resolved, `model_kwargs`) and the diffusion
    group with its defaults resolved. `config` is plain data: a resolved config, or a saved config.yaml."""
    config = dict(config)
    if "model" in config:  # arguments added since a run started (e.g. text_dim) compare at their defaults
        backbone, kwargs = model_kwargs(config["model"])
        config["model"] = {"backbone": backbone, **with_defaults(backbone, kwargs)}
    if "label_dropout" in config.get("train", {}):  # its name before text conditions: the same setting
        train = dict(config["train"])
        train["condition_dropout"] = train.pop("label_dropout")
        config["train"] = train
    if "diffusion" in config:
        config["diffusion"] = _resolved_diffusion(config["diffusion"])
    return {key: value for key, value in flatten(config).items()
            if covered(key, DEFINES_TRAINING) and not covered(key, MAY_CHANGE_ON_RESUME)}


def _validate_allowed_changes(cfg: DictConfig) -> None:
    allowed = cfg.allow_resume_changes
    if not OmegaConf.is_list(allowed) or not all(isinstance(a, str) for a in allowed):
        raise fail("allow_resume_changes", allowed, "not a list of setting names",
                   "give the settings a resume may change, e.g. allow_resume_changes=[optim.lr]")
    keys = training_definition(OmegaConf.to_container(cfg, resolve=True))
    for name in allowed:
        if not any(covered(key, [name]) for key in keys):
            raise fail("allow_resume_changes", list(allowed), f"{name!r} names no setting that defines training",
                       f"name keys such as {sorted({k.rsplit('.', 1)[0] for k in keys})[:8]} or their fields; "
                       f"settings that may change anyway: {', '.join(MAY_CHANGE_ON_RESUME)}")


def check_resume(cfg: DictConfig, checkpoint: str | os.PathLike | None, log: Callable[[str], Any] = print) -> dict:
    """The provenance record of this (re)start, after refusing a resume that changes what defines the run.

    `checkpoint` is the one to be resumed (None: a fresh start, recorded as is). Its `provenance.json` (or, for a
    checkpoint written before provenance, the run's config.yaml) is compared with `training_definition(cfg)`; any
    difference that `allow_resume_changes` does not name stops the run, listing every difference and the fixes.
    Accepted changes join the record's history. Returns `{"format", "definition", "accepted_changes"}`, written
    into every checkpoint from now on (`uvit_cog.checkpoints.save_checkpoint`).
    """
    now = training_definition(OmegaConf.to_container(cfg, resolve=True))
    record = {"format": PROVENANCE_FORMAT, "definition": now, "accepted_changes": []}
    if checkpoint is None:
        return record
    checkpoint = Path(checkpoint)
    saved = read_provenance(checkpoint)
    if saved is None:
        config = read_config(checkpoint.parent.parent)
        log(f"{checkpoint} was written before checkpoints recorded their provenance: compared with "
            f"{checkpoint.parent.parent / 'config.yaml'}" + ("" if config else " (none: nothing to compare)")
            + "; recorded from the next checkpoint on")
        try:
            before = training_definition(config) if config else {}
        except ValueError:  # a config.yaml this code cannot read as a model: compare nothing rather than guess
            before = {}
        history = []
    else:
        before, history = saved["definition"], list(saved.get("accepted_changes", []))
    diffs = differences(before, now)
    refused = {k: v for k, v in diffs.items() if not covered(k, list(cfg.allow_resume_changes))}
    if refused:
        allow = ",".join(sorted(refused))
        raise ValueError(
            f"run_dir={cfg.run_dir}: resuming {checkpoint.name} would change what defines its training:\n"
            f"{describe_differences(refused, 'the run', 'now')}\nIts steps so far were trained with the first values; "
            "continuing with the others would make a model of neither. Set them back, start another run_dir, or, if "
            f"you mean it, add allow_resume_changes=[{allow}] (the change is recorded in the run's checkpoints). "
            f"Settings that may change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}"
        )
    if diffs:
        log(f"resuming {checkpoint} with accepted changes (allow_resume_changes):\n"
            + describe_differences(diffs, "the run", "now"))
        history.append({"step": checkpoint_step(checkpoint), "changes": {k: list(v) for k, v in diffs.items()}})
    record["accepted_changes"] = history
    return record


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
