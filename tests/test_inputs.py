"""Every input is checked before work: the probe of the toolkit's entry points and library with unusual or wrong
values (docs/reliability.md, "Inputs tried"), each case with its good twin. A refused case names the field, the
value and the fix, and leaves nothing behind; the twin passes the same check."""

import importlib.util
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    ROOT,
    TINY,
    load_entry_point,
    load_sample_script,
    sample_config,
    tiny_pipeline,
    train_config,
    train_script,
)
from hydra import compose, initialize_config_dir
from PIL import Image

from uvit_cog import UViTModel, UViTPipeline
from uvit_cog.checkpoints import TRAIN_STATE, write_manifest
from uvit_cog.images import as_rgb_uint8, load_images
from uvit_cog.metrics import compute_metrics, input_kind
from uvit_cog.schedule import make_scheduler, scheduler_config

STATS_64 = dict(mu=np.zeros(64), sigma=np.eye(64))
STATS_2048 = dict(mu=np.zeros(2048), sigma=np.eye(2048))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs of every kind the cases below point at."""
    root = tmp_path_factory.mktemp("inputs")
    np.savez(root / "stats64.npz", **STATS_64)
    np.savez(root / "stats2048.npz", **STATS_2048)
    np.savez(root / "mean_cov.npz", mean=np.zeros(2048), cov=np.eye(2048))
    np.savez(root / "one_image.npz", arr_0=np.zeros((16, 16, 3), np.uint8))  # one HWC image, no batch axis
    np.savez(root / "images.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    (root / "a_file").write_text("not a folder")
    (root / "folder").mkdir()
    (root / "dir.npz").mkdir()
    return {p.stem if p.is_file() else p.name: p for p in root.iterdir()}


# ----------------------------------------------------------------------------------------------------------
# train.py: every number, name and switch (train_setup.validate_config, before the run directory exists)

TRAIN_CASES = {
    "log.every=0": r"log.every=0: out of range; set log.every to an integer >= 1",
    "train.steps=abc": r"train.steps='abc': not an integer; set train.steps to an integer >= 1",
    "train.steps=1.5": r"train.steps=1.5: not an integer",
    "optim.lr=-0.001": r"optim.lr=-0.001: out of range; set optim.lr to a finite number > 0",
    "optim.lr=nan": r"optim.lr=nan: not finite",
    "seed=9223372036854775808": r"seed=9223372036854775808: out of range; set seed to an integer in \[0, 4294967295\]",
    "sample.guidance=nan": r"sample.guidance=nan: not finite",
    "fid.guidance=inf": r"fid.guidance=inf: not finite",
    "train.ema_decay=1.0": r"train.ema_decay=1.0: out of range; set train.ema_decay to a finite number in \[0, 1\)",
    "train.mixed_precision=fp8": r"train.mixed_precision='fp8': unknown name; choose one of \['no', 'bf16', 'fp16'\]",
    "optim.lr_schedule=cosin": r"optim.lr_schedule='cosin': unknown name; choose one of \['linear', 'cosine'",
    "optim.betas=[0.9]": r"optim.betas=\[0.9\]: not a pair",
    "val.num_images=0": r"val.num_images=0: out of range",
    "fid.num_images=1": r"fid.num_images=1: out of range; set fid.num_images to an integer >= 2",
    "train.compile=yes": r"train.compile='yes': not a boolean; set true or false",
    "model.attention_type=cgo": r"attention_type='cgo': unknown name; choose one of \[.*'cog'",
    "model.depth=3": r"model: these model.\* settings build no uvit model: depth must be an even number",
    "allow_resume_changes=optim.lr": r"allow_resume_changes='optim.lr': not a list of setting names",
    "diffusion.objective=flowmatching": r"diffusion: unknown objective 'flowmatching'",
}


@pytest.mark.parametrize("override", TRAIN_CASES)
def test_train_py_refuses_bad_values_before_any_work(override, tmp_path):
    with pytest.raises(ValueError, match=TRAIN_CASES[override]):
        train_script.train(train_config(*TINY, override, f"run_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


def test_train_py_fid_reference_is_checked_before_work(files, tmp_path):
    fid = ["fid.every=2", "fid.num_images=2", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"fid.reference: reference=.*stats64.npz: statistics of 64-d features, but "
                                         r"the input is measured on the 2048-d TF-Inception pool features"):
        train_script.train(train_config(*TINY, *fid, f"fid.reference={files['stats64']}"))
    with pytest.raises(ValueError, match=r"fid.reference: .*mean_cov.npz holds .* like statistics saved under other "
                                         r"names"):
        train_script.train(train_config(*TINY, *fid, f"fid.reference={files['mean_cov']}"))
    assert not (tmp_path / "run").exists()


def test_train_py_good_twins_pass_the_same_checks(files, tmp_path):
    """The edges of every range are accepted."""
    cfg = train_config(*TINY, "seed=4294967295", "sample.guidance=0", "fid.guidance=-1.5", "optim.lr=1e-9",
                       "train.ema_decay=0", "log.every=1", "fid.every=2", "fid.num_images=2",
                       f"fid.reference={files['stats2048']}", "allow_resume_changes=[optim.lr,diffusion]",
                       f"run_dir={tmp_path / 'run'}")
    train_script.validate_config(cfg, num_processes=1)


def test_a_training_npz_of_one_image_is_refused_not_read_as_sixteen(files, tmp_path):
    npz = ["data=npz", "data.resolution=16", "data.num_classes=0", "model.num_classes=0", "sample.guidance=1",
           "train.condition_dropout=0", "val.every=0", *TINY[:-1], f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"one_image.npz: shape \(16, 16, 3\) is ambiguous: one 16x16 image with 3 "
                                         r"channels \(H, W, C\), or 16 grayscale 16x3 images"):
        train_script.train(train_config(*npz, f"data.path={files['one_image']}"))
    assert not (tmp_path / "run" / "config.yaml").exists()


# ----------------------------------------------------------------------------------------------------------
# sample.py (check_config, before the model is loaded)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """A run directory whose final export is damaged (a truncated safetensors) beside an intact checkpoint."""
    run = tmp_path_factory.mktemp("sample") / "run"
    step = run / "checkpoints" / "step_0000002"
    tiny_pipeline().save_pretrained(step / "pipeline")
    (step / TRAIN_STATE).write_text(json.dumps({"step": 2}))
    write_manifest(step)
    shutil.copytree(step / "pipeline", run / "pipeline")
    return run


@pytest.fixture(scope="module")
def damaged_run(model_run, tmp_path_factory) -> Path:
    run = Path(shutil.copytree(model_run, tmp_path_factory.mktemp("damaged") / "run"))
    weights = run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return run


def sample_cases(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "guidance=nan": (["guidance=nan"], r"guidance=nan: not finite"),
        "guidance=inf": (["guidance=inf"], r"guidance=inf: not finite"),
        "steps=0": (["steps=0"], r"steps=0: out of range; set steps to an integer >= 1"),
        "seed=-1": (["seed=-1"], r"seed=-1: out of range"),
        "num_samples=0": (["mode=fid", "num_samples=0"], r"num_samples=0: out of range"),
        "out=a folder": ([f"out={files['folder']}"], r"out=.*folder: an existing folder; give a file path"),
        "out=no suffix": ([f"out={tmp / 'grid'}"], r"out=.*grid: not a .png file name; end it in .png"),
        "out=.jpg": ([f"out={tmp / 'grid.jpg'}"], r"out=.*grid.jpg: not a .png file name"),
        "out=under a file": ([f"out={files['a_file'] / 'grid.png'}"], r"a_file is a file, not a folder"),
        "fid out=a file": (["mode=fid", f"out={files['a_file']}"], r"out=.*a_file: an existing file, not a folder"),
        "png=false npz=false": (["mode=fid", "png=false", "npz=false"], r"png=false and npz=false"),
        "dtype=float8": (["dtype=float8"], r"dtype='float8': unknown name"),
    }


SAMPLE_CASES = [
    "guidance=nan", "guidance=inf", "steps=0", "seed=-1", "num_samples=0", "out=a folder", "out=no suffix",
    "out=.jpg", "out=under a file", "fid out=a file", "png=false npz=false", "dtype=float8"]


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sample_py_refuses_bad_options_before_loading(case, files, model_run, tmp_path):
    overrides, message = sample_cases(files, tmp_path)[case]
    with pytest.raises(ValueError, match=message):
        load_sample_script().check_config(sample_config(f"model={model_run}", *overrides))


def test_sample_py_good_twins_pass(files, model_run, tmp_path):
    sample = load_sample_script()
    for overrides in (["guidance=0", "seed=4294967295", f"out={tmp_path / 'new' / 'grid.PNG'}"],
                      ["mode=fid", f"out={files['folder']}"], ["mode=fid", "png=false", "npz=true"]):
        assert sample.check_config(sample_config(f"model={model_run}", *overrides)) == model_run / "pipeline"


def test_a_damaged_export_is_named_with_the_intact_checkpoints_beside_it(damaged_run):
    with pytest.raises(ValueError, match=r"(?s)diffusion_pytorch_model.safetensors is damaged \(.*\); the run's intact "
                                         r"checkpoints hold EMA pipelines: give one of \[.*step_0000002/pipeline'\]"):
        load_sample_script().check_config(sample_config(f"model={damaged_run}"))
    path = damaged_run / "checkpoints" / "step_0000002" / "pipeline"
    assert load_sample_script().check_config(sample_config(f"model={path}")) == path  # the twin: as suggested


# ----------------------------------------------------------------------------------------------------------
# eval/score.py (check_config, before any image is read, generated or measured)


def load_eval_script():
    spec = importlib.util.spec_from_file_location("score_script", ROOT / "eval" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def eval_cases(files: dict[str, Path], model_run: Path) -> dict[str, tuple[list[str], type, str]]:
    images = f"input={files['images']}"
    return {
        "device=gpu": ([images, "device=gpu"], ValueError,
                       r"device='gpu': not a device name; choose auto, cpu, cuda, cuda:N or mps"),
        "64-d statistics": ([images, f"reference={files['stats64']}"], ValueError, r"statistics of 64-d features"),
        "mean/cov statistics": ([images, f"reference={files['mean_cov']}"], ValueError,
                                r"like statistics saved under other names.*np.savez\(path, mu=MEAN, sigma=COV\)"),
        "save_stats=a folder": ([images, f"save_stats={files['dir.npz']}"], ValueError,
                                r"save_stats=.*dir.npz: an existing folder"),
        "save_stats under a file": ([images, f"save_stats={files['a_file'] / 's.npz'}"], ValueError,
                                    r"a_file is a file, not a folder"),
        "out=a folder": ([images, f"out={files['folder']}"], ValueError, r"out=.*folder: an existing folder"),
        "metrics=[fid,lpips]": ([images, "metrics=[fid,lpips]"], ValueError, r"unknown metrics \['lpips'\]"),
        "num_samples=0": ([images, "num_samples=0"], ValueError, r"num_samples=0: out of range"),
        "seed=2**32": ([images, "seed=4294967296"], ValueError, r"seed=4294967296: out of range"),
        "weights=missing": ([images, "weights=/no/such.pth"], FileNotFoundError, r"weights=/no/such.pth: no such file"),
        "model without num_samples": ([f"input={model_run}"], ValueError, r"is a model: set num_samples"),
        "samples_dir=a file": ([f"input={model_run}", "num_samples=2", f"samples_dir={files['a_file']}"], ValueError,
                               r"samples_dir=.*a_file: an existing file, not a folder"),
        "guidance=nan": ([f"input={model_run}", "num_samples=2", "guidance=nan"], ValueError,
                         r"guidance=nan: not finite"),
        "missing input": (["input=/no/such/folder"], FileNotFoundError, r"/no/such/folder: no such file or directory"),
    }


EVAL_CASES = ["device=gpu", "64-d statistics", "mean/cov statistics", "save_stats=a folder",
              "save_stats under a file", "out=a folder", "metrics=[fid,lpips]", "num_samples=0", "seed=2**32",
              "weights=missing", "model without num_samples", "samples_dir=a file", "guidance=nan", "missing input"]


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_py_refuses_bad_options_before_work(case, files, model_run):
    overrides, error, message = eval_cases(files, model_run)[case]
    with pytest.raises(error, match=message):
        load_eval_script().check_config(eval_config(*overrides))


def test_eval_py_good_twins_pass(files, model_run, tmp_path):
    score = load_eval_script()
    assert score.check_config(eval_config(f"input={files['images']}", f"reference={files['stats2048']}",
                                          "device=cpu", f"save_stats={tmp_path / 'new' / 'stats'}",
                                          f"out={tmp_path / 'm.json'}", "weights=offline")) == "npz"
    assert score.check_config(eval_config(f"input={model_run}", "num_samples=2", f"samples_dir={tmp_path / 's'}",
                                          "guidance=2")) == "model"


# ----------------------------------------------------------------------------------------------------------
# Image arrays and files (uvit_cog.images, through the metrics' loaders): layouts, dtypes, truncation


def test_one_image_is_refused_not_read_as_sixteen_and_a_batch_of_one_is_read(files, tmp_path):
    with pytest.raises(ValueError, match=r"shape \(16, 16, 3\) is ambiguous.*\(N, H, W, C\) \(one image: x\[None\]\)"):
        compute_metrics(files["one_image"], weights="/no/such.pth")  # refused before the weights are even looked at
    np.savez(tmp_path / "batch_of_one.npz", arr_0=np.zeros((1, 16, 16, 3), np.uint8))
    assert len(load_images(tmp_path / "batch_of_one.npz")) == 1
    assert len(load_images(np.zeros((3, 28, 28), np.uint8))) == 3  # grayscale (N, H, W) reads one way only
    with pytest.raises(ValueError, match=r"ambiguous between \(N, H, W, C\) and \(N, C, H, W\)"):
        as_rgb_uint8(np.zeros((2, 3, 8, 3), np.uint8))


@pytest.mark.parametrize("pixels,hint", [
    (np.full((2, 8, 8, 3), 200.0), r"values lie in \[200, 200\] \(0..255\): convert with x.round\(\).clip\(0, 255\)"),
    (np.full((2, 8, 8, 3), 0.5), r"\(0..1\): convert with \(x \* 255\).round\(\)"),
    (np.full((2, 8, 8, 3), -0.5), r"\(-1..1\): convert with \(\(x \+ 1\) \* 127.5\)"),
    (np.full((2, 8, 8, 3), 1000.0), r"no pixel range this toolkit knows: rescale them to 0..255 knowing what"),
    (np.full((2, 8, 8, 3), np.nan), r"it holds NaN or Inf, so it is no image"),
    (np.full((2, 8, 8, 3), 7, np.int64), r"convert with x.astype\(np.uint8\)"),
])
def test_pixels_of_other_dtypes_get_the_conversion_their_range_calls_for(pixels, hint):
    """Floats 0..255 were told `x * 255`, which turns every image white: the hint now follows the range."""
    with pytest.raises(ValueError, match=rf"pixels are {pixels.dtype}, expected uint8 0..255; .*{hint}") as error:
        as_rgb_uint8(pixels)
    assert ("x * 255" in str(error.value)) == ("0..1" in hint)  # the hint that whitens 0..255 images, only for 0..1


def test_statistics_under_other_names_are_not_taken_for_images(files):
    assert input_kind(files["mean_cov"]) == "npz"  # no mu and sigma: not read as statistics, nor as images
    with pytest.raises(ValueError, match=r"mean_cov.npz holds .*'mean': \(2048,\), 'cov': \(2048, 2048\).*no images"):
        load_images(files["mean_cov"])


def test_a_truncated_png_in_an_image_folder_stops_before_inception(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[:-12])
    with pytest.raises(OSError, match=r"1.png: truncated PNG \(no IEND chunk at its end\); replace or remove"):
        compute_metrics(folder, weights="/no/such.pth")
    (folder / "1.png").write_bytes(data)
    assert len(load_images(folder)) == 3


# ----------------------------------------------------------------------------------------------------------
# compare.py (check_config, before the first training)


def compare_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("compare", overrides=list(overrides))


COMPARE_CASES = {
    "kinds=[softmax,cgo]": r"kinds\[1\]='cgo': unknown name; choose one of \[.*'cog'",
    "objectives=[ddpm,flowmatching]": r"objectives\[1\]='flowmatching': unknown name; choose one of \['ddpm', "
                                      r"'flow_matching'\]",
    "seeds=[]": r"seeds=\[\]: empty; give at least one value",
    "seeds=[0,0]": r"seeds=\[0, 0\]: repeats a value",
    "seeds=[-1]": r"seeds\[0\]=-1: out of range",
    "verdict=vall": r"verdict='vall': unknown name",
    "kinds=[cog]": r"1 variant\(s\) \(\['cog'\]\); give at least two",
}


@pytest.mark.parametrize("override", COMPARE_CASES)
def test_compare_py_refuses_bad_options_before_training(override, files, tmp_path):
    cfg = compare_config(override, f"reference={files['stats2048']}", f"out_dir={tmp_path / 'cmp'}")
    with pytest.raises(ValueError, match=COMPARE_CASES[override]):
        load_entry_point("compare").check_config(cfg)


def test_compare_py_stops_with_the_message_and_writes_nothing(files, tmp_path):
    """`compare.py seeds=[]` raised a bare StopIteration after writing its folder."""
    out = tmp_path / "cmp"
    result = subprocess.run([sys.executable, "compare.py", "seeds=[]", f"reference={files['stats2048']}",
                             f"out_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "compare.py: seeds=[]: empty" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["compare.log"]  # Hydra's run folder (out_dir) and log only


def test_compare_py_good_twin(files, tmp_path):
    compare = load_entry_point("compare")
    cfg = compare_config("kinds=[softmax,cog]", "objectives=[ddpm,flow_matching]", "seeds=[0,4294967295]",
                         f"reference={files['stats2048']}", f"out_dir={tmp_path / 'cmp'}")
    assert list(compare.check_config(cfg)) == ["softmax+ddpm", "softmax+flow_matching", "cog+ddpm",
                                               "cog+flow_matching"]


# ----------------------------------------------------------------------------------------------------------
# analyze.py (check_config, before any analysis)


@pytest.fixture(scope="module")
def analysis_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze")
    scheduler = make_scheduler("ddpm", scheduler_config())
    for name, depth in (("shallow", 2), ("deep", 4), ("twin", 2)):
        model = UViTModel(sample_size=8, patch_size=2, embed_dim=16, depth=depth, num_heads=2, attention_type="cog")
        UViTPipeline(model, scheduler).save_pretrained(root / name)
    np.savez(root / "images.npz", x_test=np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return {p.stem if p.suffix else p.name: p for p in root.iterdir()}


def analyze_config(inputs: dict[str, Path], *overrides: str, models=("shallow", "deep")):
    a, b = models
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("analyze", overrides=[f"models.uvit={inputs[a]}", f"models.uvic={inputs[b]}",
                                             f"images={inputs['images']}", "num_images=2", "timesteps=[200]",
                                             f"out_dir={inputs['images'].parent / 'out'}", *overrides])


ANALYZE_CASES = {
    "different depths": ([], r"models of different depths \{'uvit': 3, 'uvic': 5\}: block i of one is not block i of "
                             r"another. Give block_map.*'block_map=\{uvit:\[0,1,2\],uvic:\[0,2,4\]\}'"),
    "different depths, swapped": (["models.uvit=SWAP"], r"models of different depths \{'uvit': 5, 'uvic': 3\}"),
    "timesteps=[5000]": (["timesteps=[5000]"], r"timesteps\[0\]=5000: out of range; set timesteps\[0\] to an integer "
                                               r"in \[0, 999\]"),
    "num_images=0": (["num_images=0"], r"num_images=0: out of range"),
    "num_images=100": (["num_images=100"], r"num_images=100: .*images.npz holds 4 images"),
    "map_timestep=-1": (["map_timestep=-1"], r"map_timestep=-1: out of range"),
    "query_tokens=[16]": (["query_tokens=[16]"], r"query_tokens\[0\]=16: out of range; .* in \[0, 15\]"),
    "block_map of another model": (["block_map={uvit:[0,1,2],other:[0,1,2]}"], r"block_map names \['other', 'uvit'\]"),
    "block_map of two lengths": (["block_map={uvit:[0,1,2],uvic:[0,4]}"], r"block_map lists of lengths"),
    "block_map beyond the model": (["block_map={uvit:[0,1,3],uvic:[0,2,4]}"], r"block_map.uvit=\[0, 1, 3\]: \[3\] "
                                                                             r"are no blocks of uvit"),
}


@pytest.mark.parametrize("case", ANALYZE_CASES)
def test_analyze_py_refuses_bad_options_before_any_analysis(case, analysis_inputs):
    overrides, message = ANALYZE_CASES[case]
    models = ("deep", "shallow") if "models.uvit=SWAP" in overrides else ("shallow", "deep")
    overrides = [o for o in overrides if o != "models.uvit=SWAP"]
    with pytest.raises(ValueError, match=message):
        load_entry_point("analyze").check_config(analyze_config(analysis_inputs, *overrides, models=models))


def test_analyze_py_models_of_different_depths_with_a_block_map(analysis_inputs, monkeypatch):
    """The good twins: equal depths pass, and different depths compare the blocks the map names."""
    analyze = load_entry_point("analyze")
    *_, rows = analyze.check_config(analyze_config(analysis_inputs, models=("shallow", "twin")))
    assert rows == {"uvit": [0, 1, 2], "uvic": [0, 1, 2]}
    out = analysis_inputs["images"].parent / "out"
    argv = ["analyze.py", f"models.uvit={analysis_inputs['shallow']}", f"models.uvic={analysis_inputs['deep']}",
            f"images={analysis_inputs['images']}", "num_images=2", "timesteps=[200]", f"out_dir={out}",
            "block_map={uvit:[0,1,2],uvic:[0,2,4]}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "analyze.py"), run_name="__main__")  # `python analyze.py ...`, in this process
    report = (out / "analysis.md").read_text()
    assert "| 0 | " in report and "| 1/2 | " in report and "| 2/4 | " in report
