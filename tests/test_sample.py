"""Sample sets and grids (uvit_cog.sampling) and the sample.py entry point: determinism, resume, sharding, CLI."""

import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_sample_script, read_pngs, sample_config, tiny_pipeline
from PIL import Image

from uvit_cog import load_pipeline, sampling
from uvit_cog.sample_sets import NPZ_NAME, SET_RECORD
from uvit_cog.sampling import (
    generate_samples,
    grid_classes,
    index_generator,
    make_grid_image,
    sample_grid,
)

pytestmark = pytest.mark.usefixtures("single_thread")
SAMPLER = dict(num_inference_steps=2, guidance_scale=1.5, scheduler="ddpm")  # stochastic steps on purpose


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    # Per-index generators make the images identical up to float rounding of differently batched matmuls.
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A training-run directory whose final export is a tiny class-conditional pipeline."""
    run = tmp_path_factory.mktemp("run")
    tiny_pipeline().save_pretrained(run / "pipeline")
    return run


def test_make_grid_image_layout():
    images = np.stack([np.full((4, 5, 3), 50 * (k + 1), dtype=np.uint8) for k in range(3)])
    grid = np.asarray(make_grid_image(images, nrow=2, padding=1))
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert grid[1, 1, 0] == 50 and grid[1, 7, 0] == 100 and grid[6, 1, 0] == 150 and grid[6, 7, 0] == 0
    assert make_grid_image([Image.fromarray(im) for im in images], nrow=3).size == (3 * 7 + 2, 4 + 4)


def test_sample_grid_rows_are_classes():
    pipe = tiny_pipeline()
    assert grid_classes(pipe, 2) == [0, 2] and grid_classes(pipe, 8) == [0, 1, 2]
    grid = sample_grid(pipe, n=2, class_labels=["bird", "cat"], seed=5, batch_size=3, **SAMPLER)
    assert grid.size == (2 * 10 + 2, 2 * 10 + 2)
    # Image k (row-major) is the row's class with generator seed + k, whatever the batching.
    expected = sampling.generate_images(
        sampling.with_scheduler(pipe, "ddpm"), [index_generator(5, k) for k in range(4)], [2, 2, 0, 0], 2, 1.5
    )
    assert_same_images(np.asarray(grid), np.asarray(make_grid_image(expected, nrow=2)))
    unconditional = sample_grid(tiny_pipeline(num_classes=0), n=3, num_inference_steps=2)
    assert unconditional.size == (3 * 10 + 2, 3 * 10 + 2)


def test_samples_deterministic_per_index_and_npz(tmp_path, saved):
    pipe = load_pipeline(saved)
    pipe.set_progress_bar_config(disable=True)
    generate_samples(pipe, tmp_path / "b2", num_samples=5, batch_size=2, seed=3, write_npz=True, **SAMPLER)
    generate_samples(pipe, tmp_path / "b3", num_samples=5, batch_size=3, seed=3, **SAMPLER)
    a, b = read_pngs(tmp_path / "b2", 5), read_pngs(tmp_path / "b3", 5)
    assert a.shape == (5, 8, 8, 3) and a.dtype == np.uint8
    assert_same_images(a, b)
    assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 10  # different indices, different images
    npz = np.load(tmp_path / "b2" / NPZ_NAME)
    np.testing.assert_array_equal(npz["arr_0"], a)
    # .npz only: the PNG store is temporary.
    out = generate_samples(pipe, tmp_path / "npz", num_samples=5, batch_size=5, seed=3,
                           write_png=False, write_npz=True, **SAMPLER)
    assert sorted(p.name for p in out.iterdir()) == sorted([NPZ_NAME, SET_RECORD])
    assert_same_images(np.load(out / NPZ_NAME)["arr_0"], a)


def test_resume_after_interruption(tmp_path, saved, monkeypatch):
    pipe = load_pipeline(saved)
    pipe.set_progress_bar_config(disable=True)
    reference = tmp_path / "ref"
    generate_samples(pipe, reference, num_samples=7, batch_size=7, **SAMPLER)

    real, generated = sampling.generate_images, []

    def interrupted(pipeline, generators, *args):
        if generated:  # the second batch never finishes
            raise KeyboardInterrupt
        generated.extend(generators)
        return real(pipeline, generators, *args)

    monkeypatch.setattr(sampling, "generate_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(pipe, tmp_path / "run", num_samples=7, batch_size=3, **SAMPLER)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["000000.png", "000001.png", "000002.png",
                                                                    SET_RECORD]
    (tmp_path / "run" / "000004.png.tmp").write_bytes(b"\x89PNG truncated")  # a write cut short

    def counting(pipeline, generators, *args):
        generated.extend(generators)
        return real(pipeline, generators, *args)

    generated.clear()
    monkeypatch.setattr(sampling, "generate_images", counting)
    generate_samples(pipe, tmp_path / "run", num_samples=7, batch_size=3, **SAMPLER)
    assert len(generated) == 4  # only indices 3..6
    assert_same_images(read_pngs(tmp_path / "run", 7), read_pngs(reference, 7))
    assert not list((tmp_path / "run").glob("*.tmp"))


class ThreadAccelerator:
    """The part of `accelerate.Accelerator` that generate_samples uses, for ranks run as threads."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self._barrier = rank, barrier.parties, barrier
        self.is_main_process = rank == 0

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=60)


def test_sharded_processes_generate_each_index_once(tmp_path, saved, monkeypatch):
    pipes = [load_pipeline(saved) for _ in range(2)]  # one per rank: schedulers are stateful
    reference = tmp_path / "ref"
    generate_samples(pipes[0], reference, num_samples=7, batch_size=4, **SAMPLER)
    out = tmp_path / "sharded"
    out.mkdir()
    Image.open(reference / "000005.png").save(out / "000005.png")  # resumed: already present
    shutil.copy(reference / SET_RECORD, out)  # of the same model and settings

    written, lock, real = [], threading.Lock(), sampling.save_png_atomic

    def record(image, path):
        with lock:
            written.append(path.name)
        real(image, path)

    monkeypatch.setattr(sampling, "save_png_atomic", record)
    barrier, errors = threading.Barrier(2), []

    def rank(r):
        try:
            generate_samples(pipes[r], out, num_samples=7, batch_size=2, write_npz=True,
                             accelerator=ThreadAccelerator(r, barrier), **SAMPLER)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(written) == [f"{i:06d}.png" for i in (0, 1, 2, 3, 4, 6)]  # each missing index exactly once
    assert_same_images(np.load(out / NPZ_NAME)["arr_0"], read_pngs(reference, 7))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(batch_size=0), "batch_size"),
        (dict(write_png=False), "nothing to write"),
        (dict(class_labels=["horse"]), "unknown class name"),
        (dict(class_labels=[7]), "out of range"),
        (dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_generate_samples_bad_inputs(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_samples(tiny_pipeline(), tmp_path / "out", **{"num_samples": 2, **kwargs})
    assert not (tmp_path / "out").exists()


def test_sample_py_grid_from_command_line(tmp_path, saved, monkeypatch):
    out = tmp_path / "grid.png"
    argv = ["sample.py", f"model={saved}", "mode=grid", "scheduler=dpm_solver", "steps=2", "guidance=1.5",
            "grid_size=3", "classes=[bird,cat]", f"out={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")  # `python sample.py ...`, in this process
    assert Image.open(out).size == (3 * 10 + 2, 2 * 10 + 2)  # 2 class rows of 3 images


def test_sample_py_fid_mode_resumes(tmp_path, saved):
    sample = load_sample_script()
    cfg = sample_config(f"model={saved}", "mode=fid", "num_samples=4", "batch_size=3", "steps=2",
                        "scheduler=unipc", "npz=true")
    sample.main(cfg)
    out = sample.output_path(cfg)
    assert out == saved / "samples" / "fid-unipc-2steps-g1.0-seed0"
    first = read_pngs(out, 4)
    (out / "000001.png").unlink()
    sample.main(cfg)
    np.testing.assert_array_equal(read_pngs(out, 4), first)
    np.testing.assert_array_equal(np.load(out / NPZ_NAME)["arr_0"], first)


@pytest.mark.parametrize("classes,tag,rows", [("2", "classes2", 1), ("bird", "classesbird", 1),
                                             ("[bird,0]", "classesbird_0", 2)])
def test_sample_py_grid_single_class(saved, monkeypatch, classes, tag, rows):
    """`python sample.py model=RUN mode=grid classes=3`: one class as well as a list, in the default output name."""
    argv = ["sample.py", f"model={saved}", "mode=grid", "steps=2", "grid_size=3", f"classes={classes}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    out = saved / "samples" / f"grid-dpm_solver-2steps-g1.0-seed0-{tag}.png"
    assert Image.open(out).size == (3 * 10 + 2, rows * 10 + 2)


# Runs sample.py (argv[1:]) but, right before the rename that would publish the file named
# $PAUSE_BEFORE_PUBLISHING (its temporary file written in full), touches $PAUSE_MARKER and sleeps: the
# test kills it there with SIGKILL, the worst moment for a write-then-rename.
PAUSE_HOOK = """
import os, runpy, sys, time
target, marker, real_replace = os.environ["PAUSE_BEFORE_PUBLISHING"], os.environ["PAUSE_MARKER"], os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == target:
        open(marker, "w").close()
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_paused(args: list[str], target: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start `python sample.py ARGS` in a subprocess that pauses before publishing `target`."""
    marker, log = tmp_path / f"paused-{target}", (tmp_path / f"log-{target}").open("w")
    env = {**os.environ, "PAUSE_BEFORE_PUBLISHING": target, "PAUSE_MARKER": str(marker),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_HOOK, str(ROOT / "sample.py"), *args],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    return proc, marker


def kill_when_paused(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = marker.with_name(marker.name.replace("paused-", "log-")).read_text()
            pytest.fail(f"sample.py did not reach the pause (rc {proc.poll()}):\n{log}")
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup handler runs
    assert proc.wait(timeout=30) == -9


def sample_files(folder: Path) -> dict[str, Path]:
    """Every file a reader of the set would take for a sample: `*.png` and `*.npz`, also in hidden folders."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.suffix in (".png", ".npz")}


def test_sample_py_fid_killed_mid_set_and_rerun(tmp_path, saved):
    """kill -9 inside a PNG write (PNG + .npz set) and inside the .npz write (.npz-only set), then rerun: the
    finished folders equal an uninterrupted run's bit for bit; no partial PNG / .npz is visible at any time."""
    common = [f"model={saved}", "mode=fid", "num_samples=6", "batch_size=4", "steps=2", "scheduler=ddpm",
              "guidance=1.5", "npz=true"]
    both, npz_only = [*common, f"out={tmp_path / 'both'}"], [*common, "png=false", f"out={tmp_path / 'npz'}"]
    # Index 5 is the second image of the second batch: 4 is published, 5 is not, and the rerun batches 5 alone.
    paused = [start_paused(both, "000005.png", tmp_path), start_paused(npz_only, NPZ_NAME, tmp_path)]

    sample = load_sample_script()
    reference = tmp_path / "reference"
    sample.main(sample_config(*common, f"out={reference}"))  # uninterrupted, meanwhile
    ref_png = {name: p.read_bytes() for name, p in sample_files(reference).items() if name.endswith(".png")}
    ref_npz = np.load(reference / NPZ_NAME)["arr_0"]
    assert sorted(ref_png) == [f"{i:06d}.png" for i in range(6)]

    for proc, marker in paused:
        kill_when_paused(proc, marker)
    # What a reader sees after the kill: only complete files, each the uninterrupted run's.
    assert sorted(sample_files(tmp_path / "both")) == [f"{i:06d}.png" for i in range(5)]
    assert sorted(sample_files(tmp_path / "npz")) == [f".parts/{i:06d}.png" for i in range(6)]  # no .npz
    for folder in ("both", "npz"):
        for name, path in sample_files(tmp_path / folder).items():
            assert path.read_bytes() == ref_png[Path(name).name], name

    for args in (both, npz_only):
        sample.main(sample_config(*args))
    files = {p.name for p in (tmp_path / "both").iterdir()}
    assert files == {p.name for p in reference.iterdir()}, "leftovers of the killed run"
    assert {name: p.read_bytes() for name, p in sample_files(tmp_path / "both").items() if name.endswith(".png")} \
        == ref_png
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == sorted([NPZ_NAME, SET_RECORD]), \
        "leftovers of the killed run"
    for folder in ("both", "npz"):
        np.testing.assert_array_equal(np.load(tmp_path / folder / NPZ_NAME)["arr_0"], ref_npz)


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("mode=video", ValueError, r"mode='video': unknown name; choose one of \['grid', 'fid'\]"),
        ("scheduler=plms", ValueError, r"scheduler='plms': unknown name; choose one of \['ddim'"),
        ("dtype=float8", ValueError, r"dtype='float8': unknown name; choose one of \['float32'"),
        ("model=/does/not/exist", FileNotFoundError, "does not exist"),
    ],
)
def test_sample_py_bad_options(saved, override, error, message):
    cfg = sample_config(f"model={saved}", override)
    with pytest.raises(error, match=message):
        load_sample_script().check_config(cfg)
