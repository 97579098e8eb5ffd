"""The run-directory format, written and read in this one place.

A training run (`run_dir`) is laid out as

    config.yaml                        the resolved config of the latest (re)start, once its data and model are built
    metrics.jsonl                      one JSON record per logging step (and per FID / validation evaluation)
    samples/step_XXXXXXX.png           sample grids of the EMA model from fixed seeds
    checkpoints/step_XXXXXXX/          one checkpoint (see `uvit_cog.checkpoints`): accelerate state,
                                       train_state.json, provenance.json (what defines the run), pipeline/ (the EMA
                                       export) and manifest.json
    pipeline/                          the final EMA model as a `UViTPipeline` directory
    train.lock                         held by the training process that owns the run

A pipeline directory is anything diffusers' `from_pretrained` reads (`model_index.json`). Every tool that
takes a "model" accepts either: `resolve_pipeline_dir` finds the pipeline inside a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import yaml
from safetensors import safe_open

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PIPELINE_DIR = "pipeline"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
MODEL_INDEX = "model_index.json"
TMP_PREFIX = ".tmp_"
LOCK_FILE = "train.lock"
TEXT_ENCODER_DIR = "text_encoder"  # a run's own text encoder, when training made it (data.text_encoder=random)


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


def run_of_pipeline(pipe_dir: str | os.PathLike) -> Path | None:
    """The training run a pipeline directory belongs to (`RUN/pipeline`, `RUN/checkpoints/step_*/pipeline`), or
    None for a pipeline directory of its own."""
    pipe_dir = Path(pipe_dir).resolve()
    if pipe_dir.name != PIPELINE_DIR:
        return None
    if checkpoint_step(pipe_dir.parent) >= 0 and pipe_dir.parent.parent.name == CHECKPOINTS_DIR:
        return pipe_dir.parent.parent.parent
    return pipe_dir.parent if (pipe_dir.parent / CHECKPOINTS_DIR).is_dir() else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `RUN/metrics.jsonl` in order (an empty list for a run that has logged nothing).

    A last line cut short (the process died while appending it) is dropped; a bad line elsewhere raises.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not JSON ({e}); repair or delete that line") from e
    return records


def write_config(run_dir: str | os.PathLike, text: str) -> None:
    """Write the resolved config (YAML text) of this (re)start to `RUN/config.yaml`."""
    write_text_atomic(Path(run_dir) / CONFIG_FILE, text)


def read_config(run_dir: str | os.PathLike) -> dict | None:
    """The saved `RUN/config.yaml` as plain data, None if the run has none yet."""
    path = Path(run_dir) / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


class MetricsLog:
    """Appends one JSON record per line to `RUN/metrics.jsonl` (the durable record) and passes numbers on to
    `trackers` (e.g. `Accelerator.log`: TensorBoard, W&B, ...).

    Only the main process writes. On resume, records after the resumed step (written by the run that died
    after its last checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, resume_step: int,
                 trackers: Callable[[dict, int], None] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled, self.trackers = enabled, trackers
        if enabled and self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: Mapping) -> None:
        """Write a record with a "step" key; its finite numbers other than the step also go to the trackers."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(dict(record)) + "\n")
        if self.trackers is not None:
            numbers = {k: v for k, v in record.items()
                       if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
            self.trackers(numbers, int(record["step"]))


class RunInUseError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory (`RUN/train.lock`), so two trainings never write one run.

    The lock is an `flock` held for the life of the process: the kernel releases it when the process dies,
    so a lock file left by a killed run is stale by construction and simply taken over. The file names its
    holder (host, pid, start time) for the message the second process prints.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise a `RunInUseError` naming its holder; returns a note on a stale lock taken over."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUseError(
                f"run_dir={self.path.parent} is in use by {holder} (lock {self.path}); wait for it to finish, "
                "stop it, or set another run_dir"
            ) from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return f"took over the stale lock of {previous} (that process is gone)" if previous else None

    def release(self) -> None:
        """Release the lock (the file stays; it is only a name for the holder)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def run_summary(run_dir: str | os.PathLike) -> dict:
    """Loss, FID and validation curves (and the last per-timestep validation ε-MSE), training speed and
    parameter count of a finished run, for reports; a value the run never logged is NaN (a curve: empty)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    weights = sorted((resolve_pipeline_dir(run_dir) / "transformer").glob("*.safetensors"))
    parameters = 0
    for file in weights:
        with safe_open(file, "pt") as f:
            parameters += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    curves = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None]
              for key in ("loss", "fid", "val_loss", "val_eps_mse")}
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    last_val = next((r for r in reversed(records) if "val_eps_mse_t" in r), {})

    def final(key: str) -> float:
        return curves[key][-1][1] if curves[key] else float("nan")

    return dict(
        run_dir=str(run_dir),
        **curves,
        final_loss=statistics.fmean(v for _, v in curves["loss"][-5:]) if curves["loss"] else float("nan"),
        final_fid=final("fid"),
        final_val_loss=final("val_loss"),
        final_val_eps_mse=final("val_eps_mse"),
        final_val_eps_mse_t=last_val.get("val_eps_mse_t", []),
        val_timesteps=last_val.get("val_timesteps", []),
        val_log_snr=last_val.get("val_log_snr", []),
        images_per_s=statistics.median(speeds) if speeds else float("nan"),
        parameters=parameters,
    )
