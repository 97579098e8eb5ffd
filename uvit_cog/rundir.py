"""The run-directory format, written and read in this one place.

A training run (`run_dir`) is laid out as

    config.yaml                        the resolved config of the latest (re)start
    metrics.jsonl                      one JSON record per logging step (and per FID / validation evaluation)
    samples/step_XXXXXXX.png           sample grids of the EMA model from fixed seeds
    checkpoints/step_XXXXXXX/          one checkpoint (see `uvit_cog.checkpoints`): accelerate state, ema/,
                                       train_state.json, pipeline/ (the EMA export) and manifest.json
    pipeline/                          the final EMA model as a `UViTPipeline` directory
    train.lock                         held by the training process that owns the run

A pipeline directory is anything diffusers' `from_pretrained` reads (`model_index.json`). Every tool that
takes a "model" accepts either: `resolve_pipeline_dir` finds the pipeline inside a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PIPELINE_DIR = "pipeline"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
MODEL_INDEX = "model_index.json"
TMP_PREFIX = ".tmp_"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` and rename it onto `path` once the block succeeds.

    Readers see the old file or the whole new one, never a truncated one; on an exception the temporary
    file is removed and `path` is left as it was. The temporary name (`.tmp_<name>.<pid>`) starts with a dot
    and keeps no image extension, so folder readers never pick it up. `fsync=False` skips the flush to disk:
    still safe against a killed process, not against a power loss; for many small files that are cheap to
    redo (sample PNGs: fsync makes writing them ~10x slower).
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`Path.write_text` through `atomic_write`."""
    with atomic_write(path, "w") as f:
        f.write(text)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """`RUN/checkpoints/step_XXXXXXX`."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{int(step):07d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a `step_XXXXXXX` checkpoint directory of a training run, -1 for anything else."""
    match = re.fullmatch(r"step_(\d+)", Path(path).name)
    return int(match.group(1)) if match else -1


def step_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoints/step_*` directory of a run, oldest first (complete or not: see `uvit_cog.checkpoints`)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    return sorted((p for p in root.glob("step_*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def is_pipeline_dir(path: str | os.PathLike) -> bool:
    """A diffusers pipeline directory (holds `model_index.json`)."""
    return (Path(path) / MODEL_INDEX).is_file()


def is_model_dir(path: str | os.PathLike) -> bool:
    """A pipeline directory or a training-run directory (a `pipeline/` export or `checkpoints/`)."""
    path = Path(path)
    return path.is_dir() and (is_pipeline_dir(path) or (path / PIPELINE_DIR).exists()
                              or (path / CHECKPOINTS_DIR).exists())


def resolve_pipeline_dir(path: str | os.PathLike) -> Path:
    """The pipeline directory of `path`: itself, a run's `pipeline/`, or its latest `checkpoints/step_*/pipeline/`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; give a pipeline or training run directory")
    if is_pipeline_dir(path):
        return path
    if is_pipeline_dir(path / PIPELINE_DIR):
        return path / PIPELINE_DIR
    exported = [d / PIPELINE_DIR for d in step_dirs(path) if is_pipeline_dir(d / PIPELINE_DIR)]
    if exported:
        return exported[-1]
    raise FileNotFoundError(
        f"{str(path)!r} is neither a pipeline directory (no {MODEL_INDEX}) nor a training run with "
        f"{PIPELINE_DIR}/ or {CHECKPOINTS_DIR}/step_*/{PIPELINE_DIR}/"
    )


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `RUN/metrics.jsonl` in order (an empty list for a run that has logged nothing)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
