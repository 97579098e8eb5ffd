"""Metrics: the offline Inception conversion, FID/KID maths on real CIFAR-10 features, statistics files,
input kinds and bad inputs, a model sampled then measured (sampling.sample_and_evaluate, eval/score.py),
the layering. Inception runs at ~20 images/s on these CPUs, so features of 56 images are extracted once per
session and the maths is tested on them."""

import ast
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import tiny_pipeline
from PIL import Image
from threadpoolctl import threadpool_limits

from uvit_cog import load_pipeline
from uvit_cog.images import as_rgb_uint8, load_images
from uvit_cog.inception import (
    POOL_EXTRACTOR,
    InceptionWeights,
    cache_dir,
    create_inception,
    fid_helper_torchscript,
    offline_inception_weights,
    resolve_weights,
)
from uvit_cog.metrics import (
    UNAVAILABLE,
    Statistics,
    compute_metrics,
    extract_features,
    format_table,
    frechet_distance,
    input_kind,
    load_statistics,
    metrics_from_features,
    save_statistics,
)
from uvit_cog.sample_sets import SET_RECORD
from uvit_cog.sampling import generate_samples, sample_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"
FID, KID = "frechet_inception_distance", "kernel_inception_distance_mean"


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    """FID's 2048x2048 eigendecomposition: one BLAS thread is fast; two on two busy cores can be 10x slower."""
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """The offline weights, converted into a fresh cache directory (so the conversion itself runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UVIT_COG_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield resolve_weights("offline")


@pytest.fixture(scope="session")
def cifar():
    with np.load(CIFAR) as data:
        return data["x_train"][:48]


@pytest.fixture(scope="session")
def features(weights, cifar):
    """2048-d pool features of two disjoint halves of CIFAR-10 training images and of uniform-noise images."""
    extractor = create_inception(weights, ["2048"])
    noise = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    sets = {"a": cifar[:24], "b": cifar[24:], "noise": noise}
    return {k: extract_features(load_images(v), extractor, 24, progress=False)[0] for k, v in sets.items()}


@pytest.fixture(scope="session")
def stats(features):
    return {k: Statistics.from_features(v["2048"]) for k, v in features.items()}


def fid(stats, p, q):
    return frechet_distance(stats[p].mu, stats[p].sigma, stats[q].mu, stats[q].sigma)


@pytest.fixture(scope="session")
def fid_halves(stats):
    return fid(stats, "a", "b")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_converted_weights_equal_the_torchscript(weights, cifar):
    # Same 299x299 input (torch-fidelity's resize is then the identity): a real image upsampled, and noise.
    real = np.asarray(Image.fromarray(cifar[0]).resize((299, 299), Image.BILINEAR))
    noise = np.random.default_rng(1).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    x = torch.from_numpy(np.stack([real, noise])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ours = create_inception(weights, ["2048"])(x)[0]
        theirs = torch.jit.load(str(fid_helper_torchscript())).eval()((x.float() - 128) / 128)
    assert ours.shape == theirs.shape == (2, 2048)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


def test_offline_weights_are_cached_pool_only_and_reusable_as_a_path(weights):
    path = Path(weights.path)
    assert path.parent == cache_dir() and not weights.has_logits and weights.extractor == POOL_EXTRACTOR
    mtime = path.stat().st_mtime_ns
    assert offline_inception_weights() == path and path.stat().st_mtime_ns == mtime  # reused, not reconverted
    assert resolve_weights(path) == InceptionWeights("user", str(path), False)
    with pytest.raises(ValueError, match="logits_unbiased"):
        create_inception(weights, ["2048", "logits_unbiased"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_weights(path.with_name("missing.pth"))


def test_user_weights_with_a_logits_layer_give_logits(weights, tmp_path):
    # torch-fidelity's own layout (here the converted tensors plus a random 1008-way fc): full extractor, IS possible.
    state = torch.load(weights.path) | {"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(state, tmp_path / "full.pth")
    full = resolve_weights(tmp_path / "full.pth")
    assert full.has_logits and full.extractor == "inception-v3-compat"
    pool, logits = create_inception(full, ["2048", "logits_unbiased"])(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)


def test_fid_zero_symmetric_and_real_far_from_noise(stats, fid_halves):
    assert abs(fid(stats, "a", "a")) < 1e-3
    assert fid(stats, "b", "a") == pytest.approx(fid_halves, rel=1e-6)
    assert 0 < fid_halves < 0.6 * fid(stats, "a", "noise")  # ~240 vs ~540 with 24 (8 noise) images


def test_fid_equals_independent_scipy_frechet_distance(features, fid_halves):
    # tr sqrt(S1 S2) = nuclear norm of Xc1 Xc2^T / sqrt((n1-1)(n2-1)): exact at any rank (here n << 2048).
    x1, x2 = (features[k]["2048"].double().numpy() for k in ("a", "b"))
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    nuclear = scipy.linalg.svdvals(c1 @ c2.T).sum() / np.sqrt((len(x1) - 1) * (len(x2) - 1))
    traces = (c1**2).sum() / (len(x1) - 1) + (c2**2).sum() / (len(x2) - 1)
    expected = ((x1.mean(0) - x2.mean(0)) ** 2).sum() + traces - 2 * nuclear
    assert fid_halves == pytest.approx(expected, rel=1e-6)


def test_kid_precision_recall_and_unavailable_metrics(features, stats):
    near, reasons = metrics_from_features(features["a"], features["b"], ("kid", "prc", "isc"))
    far, _ = metrics_from_features(features["a"], features["noise"], ("kid", "prc"))
    assert abs(near[KID]) < 0.1 * far[KID] and far[KID] > 0 and np.isfinite(near["kernel_inception_distance_std"])
    assert near["precision"] > 0.5 and near["recall"] > 0.5 and far["precision"] == 0
    assert near["inception_score_mean"] == UNAVAILABLE and "logits" in reasons["inception_score_mean"]
    with_logits = features["a"] | {"logits_unbiased": torch.randn(24, 1008, generator=torch.Generator().manual_seed(0))}
    isc, _ = metrics_from_features(with_logits, None, ("isc",))
    assert isc["inception_score_mean"] > 1 and isc["inception_score_std"] >= 0
    only_fid, reasons = metrics_from_features(features["a"], stats["b"], ("kid",))
    assert only_fid[KID] == UNAVAILABLE and "statistics" in reasons[KID]


def test_statistics_round_trip_and_published_files(tmp_path, stats):
    saved = Statistics(stats["a"].mu, stats["a"].sigma, 24, {"source": "cifar", "weights": "offline"})
    loaded = load_statistics(save_statistics(tmp_path / "s.npz", saved))
    np.testing.assert_array_equal(loaded.mu, saved.mu)
    np.testing.assert_array_equal(loaded.sigma, saved.sigma)
    assert (loaded.num_images, loaded.meta) == (24, saved.meta)
    # A published fid_stats_*.npz: float32 mu and sigma only.
    np.savez(tmp_path / "fid_stats.npz", mu=saved.mu.astype(np.float32), sigma=saved.sigma.astype(np.float32))
    published = load_statistics(tmp_path / "fid_stats.npz")
    assert published.num_images is None and published.mu.dtype == np.float64
    assert input_kind(tmp_path / "fid_stats.npz") == "statistics"
    with pytest.raises(FileNotFoundError, match="save_stats"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mu=saved.mu)
    with pytest.raises(ValueError, match="mu and sigma"):
        load_statistics(tmp_path / "bad.npz")


def test_npz_folder_and_statistics_end_to_end(tmp_path, weights, cifar, stats):
    # ADM-style sample batch (arr_0) against a statistics file; its own statistics are saved on the way.
    np.savez(tmp_path / "samples.npz", arr_0=cifar[:4])
    save_statistics(tmp_path / "ref.npz", Statistics(stats["b"].mu, stats["b"].sigma, 24, {"weights": "offline"}))
    record = compute_metrics(tmp_path / "samples.npz", tmp_path / "ref.npz", weights=weights,
                             save_stats=tmp_path / "own.npz", progress=False)  # fmt: skip
    assert record["input"]["num_images"] == 4 and record["reference"]["num_images"] == 24
    own = load_statistics(tmp_path / "own.npz")
    assert own.num_images == 4 and own.meta["weights"] == "offline"
    assert 0 < record["metrics"][FID] < np.inf
    assert record["metrics"][KID] == UNAVAILABLE and record["weights"]["source"] == "offline"

    # A folder with grayscale and RGBA PNGs (converted to RGB) against images, KID and precision/recall only.
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(cifar[:4]):
        Image.fromarray(image).convert(["L", "RGBA", "RGB", "L"][i]).save(folder / f"{i}.png")
    record = compute_metrics(folder, cifar[24:28], metrics=("kid", "prc"), weights=weights, progress=False)
    assert record["input"]["num_images"] == 4 and record["kid_subset_size"] == 4
    assert 0 <= record["metrics"]["recall"] <= 1 and np.isfinite(record["metrics"][KID])
    json.dumps(record)
    assert "precision" in format_table(record)


def test_input_kinds_and_conversions(tmp_path):
    np.savez(tmp_path / "mnist_like.npz", x=np.zeros((3, 28, 28), np.uint8))
    assert input_kind("cifar10-train") == "dataset"  # torch-fidelity's registry; nothing is downloaded
    assert input_kind(tmp_path / "mnist_like.npz") == "npz"
    assert load_images(tmp_path / "mnist_like.npz")[0].shape == (3, 28, 28)  # grayscale becomes RGB
    assert as_rgb_uint8(np.zeros((2, 3, 8, 8), np.uint8)).shape == (2, 8, 8, 3)  # NCHW becomes NHWC
    assert input_kind(f"{tmp_path / 'mnist_like.npz'}:x") == "npz"
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert input_kind(tmp_path / "pipe") == "model"
    ramp = np.arange(10, dtype=np.uint8)[:, None, None, None].repeat(8, 1).repeat(8, 2).repeat(3, 3)
    assert [int(x[0, 0, 0]) for x in load_images(ramp, num_samples=5)] == [0, 2, 4, 6, 8]  # evenly spaced


def bad_inputs(tmp: Path) -> dict:
    (tmp / "empty").mkdir()
    (tmp / "mixed").mkdir()
    Image.new("RGB", (32, 32)).save(tmp / "mixed" / "a.png")
    Image.new("RGB", (64, 48)).save(tmp / "mixed" / "b.png")
    np.savez(tmp / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp / "two.npz", a=np.zeros((2, 8, 8, 3), np.uint8), b=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp / "stats_in.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp / "stats.txt").write_text("mu sigma")
    (tmp / "run" / "pipeline").mkdir(parents=True)
    (tmp / "run" / "pipeline" / "model_index.json").write_text("{}")
    images = np.zeros((4, 8, 8, 3), np.uint8)
    return {
        "empty folder": ((tmp / "empty", None), {}, ValueError, "no images"),
        "mixed sizes": ((tmp / "mixed", None), {}, ValueError, "a.png is 32x32 but b.png is 64x48"),
        "missing statistics": ((images, tmp / "stats.npz"), {}, FileNotFoundError, "stats.npz"),
        "float pixels": ((tmp / "float.npz", None), {}, ValueError, "expected uint8"),
        "ambiguous npz": ((tmp / "two.npz", None), {}, ValueError, "two.npz:KEY"),
        "missing npz key": ((f"{tmp / 'two.npz'}:x", None), {}, ValueError, "no array 'x'"),
        "too few images": ((images, None), {"num_samples": 5}, ValueError, "only 4 images"),
        "unknown metric": ((images, None), {"metrics": ("fid", "lpips")}, ValueError, "lpips"),
        "statistics as input": ((tmp / "stats_in.npz", None), {}, ValueError, "only be the reference"),
        "text as statistics": ((images, tmp / "stats.txt"), {}, ValueError, "stats.txt: expected an image folder"),
        "model as input": ((tmp / "run", None), {}, ValueError, "is a model directory: sample it first"),
        "model as reference": ((images, tmp / "run"), {}, ValueError, "model directory: sample it first"),
    }


@pytest.mark.parametrize(
    "case",
    ["empty folder", "mixed sizes", "missing statistics", "float pixels", "ambiguous npz", "missing npz key",
     "too few images", "unknown metric", "statistics as input", "text as statistics", "model as input",
     "model as reference"],
)  # fmt: skip
def test_bad_inputs_fail_before_work(tmp_path, case):
    (source, reference), kwargs, error, message = bad_inputs(tmp_path)[case]
    with pytest.raises(error, match=message):
        compute_metrics(source, reference, weights="no-such-weights.pth", **kwargs)  # weights resolve after checks


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training-run directory whose final export is conftest's tiny class-conditional pipeline (8x8)."""
    run = tmp_path_factory.mktemp("run")
    tiny_pipeline().save_pretrained(run / "pipeline")
    return run


def test_sample_and_evaluate_samples_then_measures(tmp_path, weights, stats, run_dir):
    pipe = load_pipeline(run_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = Statistics(stats["b"].mu, stats["b"].sigma, 24, {"weights": "offline"})
    settings = dict(metrics=("fid",), weights=weights, scheduler="ddim", num_inference_steps=2, guidance_scale=1.5,
                    class_labels=["cat", 2], seed=3, batch_size=3, progress=False)  # fmt: skip
    for bad, message in [(dict(metrics=("lpips",)), "lpips"), (dict(reference=run_dir), "sample it first"),
                         (dict(reference=tmp_path / "missing.npz"), "missing.npz")]:  # fmt: skip
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            sample_and_evaluate(pipe, 5, **{"reference": reference, **settings, **bad, "samples_dir": tmp_path / "x"})
    assert not (tmp_path / "x").exists()  # refused before any image was generated

    record = sample_and_evaluate(pipe, 5, reference, samples_dir=tmp_path / "kept", **settings)
    assert record["input"]["num_images"] == 5 and len(list((tmp_path / "kept").glob("*.png"))) == 5
    assert record["sampler"] == {"scheduler": "ddim", "steps": 2, "guidance": 1.5, "classes": ["cat", 2],
                                 "prompts": None, "batch_size": 3, "num_samples": 5, "num_processes": 1}  # fmt: skip
    assert record["seed"] == 3 and record["timing_s"]["generate"] > 0 and 0 < record["metrics"][FID] < np.inf

    # Scratch samples: a stale image of another model in the folder is not reused, and the folder goes.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(scratch / "000000.png")
    again = sample_and_evaluate(pipe, 5, reference, samples_dir=scratch, delete_samples=True, **settings)
    assert again["metrics"][FID] == pytest.approx(record["metrics"][FID], rel=1e-6) and not scratch.exists()


def test_evaluate_py_samples_a_model_with_the_sample_py_vocabulary(tmp_path, weights, run_dir, monkeypatch):
    out = tmp_path / "metrics.json"
    argv = ["eval/score.py", f"input={run_dir}", "num_samples=4", "scheduler=ddim", "steps=2", "guidance=1.5",
            "classes=1", "sample_batch_size=2", "metrics=[fid]", f"weights={weights.path}", "progress=false",
            f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "eval" / "score.py"), run_name="__main__")  # `python eval/score.py ...`
    record = json.loads(out.read_text())
    assert record["input"] | {"spec": str(run_dir), "kind": "model", "num_images": 4} == record["input"]
    assert record["sampler"]["classes"] == [1] and record["sampler"]["steps"] == 2
    assert record["sampler"]["scheduler"] == "ddim" and record["weights"]["source"] == "user"
    assert record["unavailable"][FID] == "no reference"


def test_metrics_never_sample_and_registration_is_explicit():
    # Layering: the metrics stack imports neither the pipeline nor the sampling code, at any depth of the file.
    for name in ("metrics", "images", "inception"):
        tree = ast.parse((ROOT / "uvit_cog" / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"pipeline", "sampling", "model", "uvit_cog.pipeline", "uvit_cog.sampling"}, name
    # Importing uvit_cog.inception leaves torch-fidelity's registry alone; create_inception registers.
    code = ("import uvit_cog.inception as i, torch_fidelity.registry as r; "
            "assert i.POOL_EXTRACTOR not in r.FEATURE_EXTRACTORS_REGISTRY; i.register_pool_extractor(); "
            "assert i.POOL_EXTRACTOR in r.FEATURE_EXTRACTORS_REGISTRY")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def evaluate_py(tmp_path, monkeypatch, *overrides: str) -> dict:
    """`python eval/score.py OVERRIDES` in this process; returns the metrics record it wrote."""
    out = tmp_path / f"metrics{len(list(tmp_path.glob('metrics*.json')))}.json"
    argv = ["eval/score.py", *overrides, "metrics=[fid]", "progress=false", f"out={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "eval" / "score.py"), run_name="__main__")
    return json.loads(out.read_text())


def test_evaluating_a_model_never_scores_images_it_did_not_make(tmp_path, weights, stats, run_dir, monkeypatch, capsys):
    """The issue's case: samples_dir= a folder of another model's 60 PNGs was scored as the model's, generating
    nothing. Refused before any image is generated or measured; the good twin (the model's own larger set) is
    reused and exactly num_samples of its images are scored."""
    reference = save_statistics(tmp_path / "reference.npz", stats["b"])
    model = [f"input={run_dir}", "scheduler=ddim", "steps=2", "sample_batch_size=8", f"weights={weights.path}",
             f"reference={reference}"]
    other = tiny_pipeline()
    with torch.no_grad():
        other.transformer.pos_embed.add_(1.0)  # another model
    foreign = tmp_path / "foreign"
    generate_samples(other, foreign, num_samples=60, batch_size=60, num_inference_steps=2, scheduler="ddim")
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(foreign, unrecorded, ignore=shutil.ignore_patterns(SET_RECORD))
    for folder, message in [(foreign, r"is a sample set of another model \(60 image\(s\)"),
                            (unrecorded, r"holds 60 sample image\(s\) \(000000.png, ...\) but no sample_set.json")]:
        with pytest.raises(SystemExit):  # Hydra prints the error and exits with status 1
            evaluate_py(tmp_path, monkeypatch, *model, "num_samples=4", f"samples_dir={folder}")
        assert re.search(message, capsys.readouterr().err) and len(list(folder.glob("*.png"))) == 60
    own = tmp_path / "own"
    evaluate_py(tmp_path, monkeypatch, *model, "num_samples=6", f"samples_dir={own}")
    record = evaluate_py(tmp_path, monkeypatch, *model, "num_samples=4", f"samples_dir={own}")
    assert record["input"]["num_images"] == 4 and len(list(own.glob("*.png"))) == 6
