"""Training checkpoints that verify themselves, resume safely and never execute code.

A checkpoint `RUN/checkpoints/step_XXXXXXX/` holds

    model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl   accelerate's `save_state`
    pipeline/                                                                   the EMA model as a `UViTPipeline`
    train_state.json                                                            step, data position, processes
    provenance.json                                                             what defines the run (below)
    manifest.json                                                               every other file: size, SHA-256

It is written into `checkpoints/.tmp_step_XXXXXXX/` and renamed into place once complete, so a reader sees a
whole checkpoint or none. Trust model (docs/reliability.md): the EMA is restored from the export's
safetensors, never from a pickle (accelerate unpickles objects registered with `register_for_checkpointing`
with `weights_only=False`, so nothing is registered), and accelerate reads the rest with `weights_only=True`.
The manifest catches damage (truncation, bit rot, a planted or swapped file) before anything is read; it is
no signature: whoever can write the run directory can write a matching manifest, but still cannot make
loading run code.

`provenance.json` (`PROVENANCE_FORMAT` 1) records what defines the run's training, so that a resume cannot change
it silently: `{"format": 1, "definition": {dotted config key: value, ...}, "accepted_changes": [{"step": N,
"changes": {key: [before, after]}}, ...]}` (made and checked by train_setup.check_resume). It lives in the
checkpoint, not beside it, so the record always describes the weights it sits with, and a start that fails before
its first checkpoint leaves nothing that a later start is compared with. Checkpoints written before it have none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .pipeline import UViTPipelineBase, build_pipeline
from .rundir import (
    CHECKPOINTS_DIR,
    PIPELINE_DIR,
    TMP_PREFIX,
    checkpoint_dir,
    resolve_pipeline_dir,
    run_of_pipeline,
    step_dirs,
    write_text_atomic,
)
from .schedule import default_scheduler

TRAIN_STATE = "train_state.json"
PROVENANCE = "provenance.json"
PROVENANCE_FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
OLD_PREFIX = ".old_"
# Test hooks for the fault-injection suite: with UVIT_COG_PAUSE_AT=<point> the process touches the file named
# by UVIT_COG_PAUSE_MARKER and sleeps at that point of a checkpoint write, so a test can kill it exactly there.
PAUSE_AT, PAUSE_MARKER = "UVIT_COG_PAUSE_AT", "UVIT_COG_PAUSE_MARKER"
PAUSE_POINTS = ("state_saved", "exported", "manifest_written", "moved_aside", "committed")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no intact checkpoint could be found to resume from."""


def pause_point(name: str) -> None:
    """Block forever at `name` when the fault-injection hook asks for it (see `PAUSE_AT`); otherwise nothing."""
    if os.environ.get(PAUSE_AT) != name:
        return
    Path(os.environ[PAUSE_MARKER]).touch()
    while True:
        time.sleep(60)


# ----------------------------------------------------------------------------------------------------------
# Manifests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: str | os.PathLike) -> Path:
    """Record the name, size and SHA-256 of every file under `root` in `root/manifest.json`."""
    root = Path(root)
    files = {name: {"size": (root / name).stat().st_size, "sha256": _sha256(root / name)} for name in _files(root)}
    path = root / MANIFEST
    write_text_atomic(path, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
    return path


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint at `path` (an empty list if it is intact).

    Missing, truncated or changed files and files the manifest does not list (e.g. a planted pickle) are all
    reported. A checkpoint written before manifests existed (train_state.json but no manifest.json) cannot be
    verified and is reported intact; its files are still only read weights-only.
    """
    root = Path(path)
    if not (root / MANIFEST).is_file():
        return [] if (root / TRAIN_STATE).is_file() else [f"{root}: no {MANIFEST} and no {TRAIN_STATE}"]
    try:
        listed = json.loads((root / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{root / MANIFEST}: unreadable ({e})"]
    problems = []
    for name, entry in listed.items():
        file = root / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {entry['size']}")
        elif _sha256(file) != entry["sha256"]:
            problems.append(f"{file}: contents changed (SHA-256 differs from the manifest)")
    problems += [f"{root / name}: not in the manifest (planted or left by another tool)"
                 for name in _files(root) if name not in listed]
    return problems


# ----------------------------------------------------------------------------------------------------------
# Writing


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The committed checkpoints of a run, oldest first (a directory is committed once renamed into place)."""
    return [p for p in step_dirs(run_dir) if (p / TRAIN_STATE).is_file()]


def commit_checkpoint(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place with a rename: readers see all of it or none of it.

    Saving a step that already exists (e.g. after resuming from an older checkpoint) moves the old copy aside
    to `.old_<name>` first; `recover_checkpoints` puts it back if the process dies before the new one is in.
    """
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(OLD_PREFIX + final.name)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    pause_point("moved_aside")
    os.replace(tmp, final)
    shutil.rmtree(old)


def recover_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Undo what an interrupted save left (main process, before training); returns what was done, for the log.

    A step moved aside whose replacement never arrived is restored; temporary directories are deleted.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    done = []
    for old in sorted(root.glob(f"{OLD_PREFIX}step_*")):
        final = root / old.name[len(OLD_PREFIX):]
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
            done.append(f"restored {final.name} (an interrupted save had moved it aside)")
    for tmp in sorted(root.glob(f"{TMP_PREFIX}*")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the unfinished {tmp.name}")
    return done


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, step: int, train_state: Mapping,
                    export: Callable[[Path], None], keep: int, provenance: Mapping | None = None) -> Path:
    """Save a verified, atomic checkpoint `checkpoints/step_XXXXXXX` and keep the newest `keep`.

    Every rank calls this (DeepSpeed and FSDP save collectively). The main process writes the pipeline export
    (the EMA), the train state, the provenance record (when given) and the manifest into a temporary directory,
    renames it into place, and prunes.
    A failed write (a full disk, a lost mount) removes the temporary directory, leaves every earlier checkpoint as
    it was and raises a `CheckpointError` that says so; so does any other error while writing.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in before the manifest lists them
        if accelerator.is_main_process:
            pause_point("state_saved")
            export(tmp / PIPELINE_DIR)
            write_text_atomic(tmp / TRAIN_STATE, json.dumps(dict(train_state), indent=1))
            if provenance is not None:
                write_text_atomic(tmp / PROVENANCE, json.dumps(dict(provenance), indent=1))
            pause_point("exported")
            write_manifest(tmp)
            pause_point("manifest_written")
            commit_checkpoint(tmp, final)
            pause_point("committed")
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old)
    except Exception as e:  # torch.save reports a full disk as a RuntimeError, safetensors and json as OSError
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(run_dir)]
        free = shutil.disk_usage(final.parent).free
        raise CheckpointError(
            f"could not write the checkpoint of step {step} ({type(e).__name__}: {e}); {free / 2**20:.1f} MiB free "
            f"in {final.parent}. The unfinished copy was removed and the earlier checkpoints are untouched "
            f"({', '.join(previous) or 'none yet'}). Free space or fix the folder, then run the same command again "
            "to resume from the latest one."
        ) from e
    accelerator.wait_for_everyone()
    return final


def export_pipeline(transformer: nn.Module, noise_schedule: Mapping, vae: nn.Module | None,
                    out_dir: str | os.PathLike, text_encoder: nn.Module | None = None,
                    tokenizer: Any = None) -> UViTPipelineBase:
    """Save `transformer` (the EMA model) with its training noise schedule (and VAE, and for a text-conditional
    model its text encoder and tokenizer) as the pipeline of its kind (`build_pipeline`).

    `noise_schedule` is a `uvit_cog.schedule.scheduler_config`; the pipeline carries it as the default scheduler
    of its objective (`default_scheduler`: a DDPM scheduler, or a flow-matching Euler scheduler with every key
    of its config explicit), from which `make_scheduler` builds any other sampler of that family.
    """
    pipeline = build_pipeline(transformer, default_scheduler(noise_schedule), vae, text_encoder, tokenizer)
    pipeline.save_pretrained(out_dir)
    return pipeline


def export_final_pipeline(transformer: nn.Module, noise_schedule: Mapping, vae: nn.Module | None,
                          run_dir: str | os.PathLike, text_encoder: nn.Module | None = None,
                          tokenizer: Any = None) -> Path:
    """Write `RUN/pipeline` atomically: a temporary directory renamed into place."""
    final = Path(run_dir) / PIPELINE_DIR
    tmp = final.with_name(TMP_PREFIX + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    export_pipeline(transformer, noise_schedule, vae, tmp, text_encoder, tokenizer)
    commit_checkpoint(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------------------
# Resuming


def select_checkpoint(run_dir: str | os.PathLike, resume: str, log: Callable[[str], None] = print) -> Path | None:
    """The verified checkpoint to resume from, or None to start fresh.

    `resume="auto"`: the newest intact checkpoint of `run_dir` (damaged newer ones are named in the log and
    skipped); None if the run has none; a `CheckpointError` naming every damaged file if none is intact.
    `resume="never"`: None, refusing a run that already has checkpoints. A path: that checkpoint, verified.
    """
    found = list_checkpoints(run_dir)
    if resume == "never":
        if found:
            raise ValueError(f"run_dir={run_dir} already has checkpoints (latest {found[-1].name}): use "
                             "resume=auto to continue it or set another run_dir")
        return None
    candidates = found[::-1] if resume == "auto" else [Path(resume)]
    damaged: dict[Path, list[str]] = {}
    for path in candidates:
        problems = verify_checkpoint(path)
        if not problems:
            for bad, why in damaged.items():
                log(f"checkpoint {bad} is damaged, skipped: " + "; ".join(why))
            if damaged:
                log(f"resuming from {path}, the newest intact checkpoint")
            return path
        damaged[path] = problems
    if not damaged:
        return None
    details = "\n".join(f"  {p}: " + "; ".join(why) for p, why in damaged.items())
    raise CheckpointError(f"no intact checkpoint to resume from:\n{details}\nrestore the files, point resume= at "
                          "another checkpoint, or start over with another run_dir")


def select_checkpoint_for_all(accelerator: Accelerator, run_dir: str | os.PathLike, resume: str) -> Path | None:
    """`select_checkpoint` once, by the main process, and its choice (or its error) on every rank.

    Verifying hashes every file of a checkpoint: done on each of 8 ranks it reads the checkpoint 8 times, and
    ranks that verified separately could even choose differently while a file is being damaged. The main process
    chooses after it has recovered interrupted saves; the other ranks wait for its answer.
    """
    choice: list[Path | Exception | None] = [None]
    if accelerator.is_main_process:
        try:
            choice[0] = select_checkpoint(run_dir, resume, log=accelerator.print)
        except (CheckpointError, ValueError) as e:  # raised on every rank below, so none waits for the others
            choice[0] = e
    chosen = broadcast_object_list(choice)[0]
    if isinstance(chosen, Exception):
        raise chosen
    return chosen


def check_model_dir(path: str | os.PathLike) -> Path:
    """The pipeline directory of a model path (`resolve_pipeline_dir`), its safetensors files checked readable
    (header and size: a truncated file is caught here, before any work). A damaged export of a training run is
    reported with the run's intact checkpoints, whose pipelines can be given instead."""
    pipe_dir = resolve_pipeline_dir(path)
    for file in sorted(pipe_dir.rglob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            run = run_of_pipeline(pipe_dir)
            intact = [c / PIPELINE_DIR for c in list_checkpoints(run) if c / PIPELINE_DIR != pipe_dir
                      and not verify_checkpoint(c)] if run is not None else []
            fix = (f"the run's intact checkpoints hold EMA pipelines: give one of {[str(c) for c in intact[::-1]]} "
                   "instead (newest first)" if intact else "restore the file from a copy")
            raise ValueError(f"model={path}: {file} is damaged ({e}); {fix}") from e
    return pipe_dir


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance record of the checkpoint at `path`, None for one written before checkpoints had one."""
    file = Path(path) / PROVENANCE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
        if record["format"] != PROVENANCE_FORMAT or not isinstance(record["definition"], dict):
            raise ValueError(f"format {record['format']!r}, expected {PROVENANCE_FORMAT}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable provenance record ({e}); the checkpoint matches its manifest, so "
                              "it was written this way: restore the run from a copy, or resume= an older one") from e
    return record


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike, ema: nn.Module) -> dict:
    """Restore model, optimiser, LR schedule and RNG states (accelerate, weights-only) and the EMA (safetensors).

    Returns the train state (step, data position).
    """
    path = Path(path)
    legacy_pickles = sorted(path.glob("custom_checkpoint_*.pkl"))  # the pickled EMA of checkpoints before manifests
    if legacy_pickles:
        # accelerate refuses a folder whose custom checkpoints outnumber the registered objects (none): hand it a
        # view of the checkpoint without them, so the pickles are never read.
        with tempfile.TemporaryDirectory() as view:
            for item in path.iterdir():
                if item not in legacy_pickles:
                    os.symlink(item.resolve(), Path(view) / item.name)
            accelerator.load_state(view)
    else:
        accelerator.load_state(str(path))
    weights = sorted((path / PIPELINE_DIR / "transformer").glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path}: no EMA weights in {PIPELINE_DIR}/transformer/*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for file in weights:
        state.update(load_file(file, device=str(next(ema.parameters()).device)))
    ema.load_state_dict(state, strict=True)
    return json.loads((path / TRAIN_STATE).read_text())
