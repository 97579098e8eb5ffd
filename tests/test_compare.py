"""compare.py: the micro preset end to end (both variants trained, FID and validation loss, paired by seed, one
table and one plot), variant construction and the paired statistics."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_entry_point
from hydra import compose, initialize_config_dir
from PIL import Image


def test_micro_comparison_writes_table_and_plot(tmp_path):
    data = np.load(ROOT.parent / "shared" / "data" / "cifar10.npz")
    np.savez(tmp_path / "ref.npz", arr_0=data["x_test"][:16])
    out = tmp_path / "cmp"
    subprocess.run(
        [sys.executable, "compare.py", "compare=micro", f"reference={tmp_path / 'ref.npz'}", f"out_dir={out}"],
        check=True, cwd=ROOT, capture_output=True,
    )
    report = (out / "report.md").read_text()
    assert "| softmax | 0 |" in report and "| cog | 0 |" in report and "**Verdict** (the held-out validation" in report
    assert "**cog** vs softmax: validation ε-MSE difference" in report and "| cog | softmax | validation" in report
    results = json.loads((out / "report.json").read_text())
    runs = results["runs"]
    for model in ("softmax", "cog"):
        run = runs[model]["0"]
        assert [s for s, _ in run["fid"]] == [2, 4] and all(np.isfinite(f) for _, f in run["fid"])
        assert [s for s, _ in run["val_eps_mse"]] == [2, 4] and len(run["final_val_eps_mse_t"]) == 3
        assert run["parameters"] > 0 and run["images_per_s"] > 0
    # Same config apart from the attention: the same parameter count and, seed for seed, the same initial
    # weights and data, so the paired difference is the reported one.
    assert runs["softmax"]["0"]["parameters"] == runs["cog"]["0"]["parameters"]
    diff = results["paired"]["val"]["cog"]["diffs"]["0"]
    assert diff == runs["cog"]["0"]["final_val_eps_mse"] - runs["softmax"]["0"]["final_val_eps_mse"]
    per_t = results["paired_per_timestep"]["cog"]
    assert per_t["diffs"]["0"] == pytest.approx(np.subtract(runs["cog"]["0"]["final_val_eps_mse_t"],
                                                            runs["softmax"]["0"]["final_val_eps_mse_t"]).tolist())
    assert f"| cog | softmax | {per_t['mean'][0]:+.4f} ({per_t['lower'][0]}/1) |" in report
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG"
    # A second invocation keeps the finished runs instead of training again.
    again = subprocess.run(
        [sys.executable, "compare.py", "compare=micro", f"reference={tmp_path / 'ref.npz'}", f"out_dir={out}"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )
    assert again.stdout.count("is finished; keeping it") == 2


def compare_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("compare", overrides=["reference=x", *overrides])


def test_kinds_and_objectives_make_every_combination_with_the_first_as_baseline():
    compare = load_entry_point("compare")
    assert compare.variants(compare_config()) == {"softmax": ["model.attention_type=softmax"],
                                                  "cog": ["model.attention_type=cog"]}
    specs = compare.variants(compare_config("kinds=[softmax,cog,sigmoid]", "objectives=[ddpm,flow_matching]"))
    assert list(specs)[:3] == ["softmax+ddpm", "softmax+flow_matching", "cog+ddpm"] and len(specs) == 6
    assert specs["cog+flow_matching"] == ["model.attention_type=cog", "diffusion.objective=flow_matching",
                                          "sample.scheduler=flow_euler", "fid.scheduler=flow_euler",
                                          "diffusion.clip_sample=false"]
    assert compare.variants(compare_config("compare=gpu"))["cog"] == ["experiment=cifar10_uvic_s2"]


def test_paired_differences_are_per_seed():
    compare = load_entry_point("compare")
    runs = {"softmax": {0: {"v": 1.0}, 1: {"v": 2.0}, 2: {"v": 3.0}},
            "cog": {0: {"v": 0.9}, 1: {"v": 1.8}, 2: {"v": 3.1}}}
    stats = compare.paired(runs, "v", {"cog": "softmax"})["cog"]
    assert stats["diffs"] == pytest.approx({0: -0.1, 1: -0.2, 2: 0.1}) and (stats["lower"], stats["n"]) == (2, 3)
    assert stats["mean"] == pytest.approx(-0.2 / 3)
    assert "no consistent difference" in compare.verdict_lines("cog", stats, "v", cross_objective=False)


def test_per_timestep_differences_are_paired_within_an_objective():
    compare = load_entry_point("compare")

    def run(values, log_snr=(2.0, -2.0)):
        return {"final_val_eps_mse_t": list(values), "val_timesteps": [50.0, 500.0], "val_log_snr": list(log_snr)}

    flow = (5.9, 0.0)  # the same model timesteps t·1000, at a flow model's noise levels
    results = {"softmax": {0: run([1.0, 0.5]), 1: run([2.0, 0.4])},
               "cog": {0: run([0.9, 0.6]), 1: run([1.5, 0.5])},
               "softmax+fm": {0: run([0.3, 0.2], flow), 1: run([0.3, 0.2], flow)}}
    per_t = compare.paired_per_timestep(results, {"cog": "softmax", "softmax+fm": "softmax"})
    assert list(per_t) == ["cog"]  # another objective's grid lies at other noise levels: no per-timestep pairing
    assert per_t["cog"]["diffs"] == {0: pytest.approx([-0.1, 0.1]), 1: pytest.approx([-0.5, 0.1])}
    assert per_t["cog"]["mean"] == pytest.approx([-0.3, 0.1]) and per_t["cog"]["lower"] == [2, 0]


def test_variants_are_compared_within_their_objective():
    compare = load_entry_point("compare")
    specs = compare.variants(compare_config("kinds=[softmax,cog]", "objectives=[ddpm,flow_matching]"))
    assert compare.baselines(specs) == {"softmax+flow_matching": "softmax+ddpm", "cog+ddpm": "softmax+ddpm",
                                        "cog+flow_matching": "softmax+flow_matching"}


def test_text_to_image_comparison_without_fid_is_judged_by_the_validation_loss(tmp_path):
    out = tmp_path / "cmp"
    subprocess.run([sys.executable, "compare.py", "compare=t2i_micro", f"out_dir={out}"], check=True, cwd=ROOT,
                   capture_output=True)
    results = json.loads((out / "report.json").read_text())
    for model in ("softmax", "cog"):
        run = results["runs"][model]["0"]
        assert run["fid"] == [] and [s for s, _ in run["val_eps_mse"]] == [2, 4]
    assert "**Verdict** (the held-out validation" in (out / "report.md").read_text()
    refused = subprocess.run([sys.executable, "compare.py", "compare=t2i_micro", "verdict=fid",
                              f"out_dir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "verdict=fid needs reference" in refused.stderr + refused.stdout
