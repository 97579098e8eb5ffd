"""Sample sets and grids (uvit_cog.sampling) and the sample.py entry point: determinism, resume, sharding, CLI."""

import importlib.util
import runpy
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize
from PIL import Image
from test_pipeline import single_thread, tiny_pipeline  # noqa: F401 - autouse fixture

from uvit_cog import load_pipeline, sampling
from uvit_cog.sampling import (
    NPZ_NAME,
    generate_samples,
    grid_classes,
    index_generator,
    make_grid_image,
    sample_grid,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLER = dict(num_inference_steps=2, guidance_scale=1.5, scheduler="ddpm")  # stochastic steps on purpose


def read_pngs(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


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
    assert sorted(p.name for p in out.iterdir()) == [NPZ_NAME]
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
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["000000.png", "000001.png", "000002.png"]
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


def load_sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # also registers conf/sample.yaml with Hydra
    return module


def sample_config(*overrides: str):
    load_sample_script()
    with initialize(config_path=None, version_base=None):
        return compose("sample", overrides=list(overrides))


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


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("mode=video", ValueError, "unknown mode 'video'"),
        ("scheduler=plms", ValueError, "unknown scheduler 'plms'"),
        ("dtype=float8", ValueError, "unknown dtype"),
        ("model=/does/not/exist", FileNotFoundError, "does not exist"),
    ],
)
def test_sample_py_bad_options(saved, override, error, message):
    cfg = sample_config(f"model={saved}", override)
    with pytest.raises(error, match=message):
        load_sample_script().check_config(cfg)
