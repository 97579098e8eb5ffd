"""compare.py on the micro preset: both models trained, FID at checkpoints, one table and one plot."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_micro_comparison_writes_table_and_plot(tmp_path):
    data = np.load(ROOT.parent / "shared" / "data" / "cifar10.npz")
    np.savez(tmp_path / "ref.npz", arr_0=data["x_test"][:16])
    out = tmp_path / "cmp"
    subprocess.run(
        [sys.executable, "compare.py", "compare=micro", f"reference={tmp_path / 'ref.npz'}", f"out_dir={out}"],
        check=True, cwd=ROOT, capture_output=True,
    )
    report = (out / "report.md").read_text()
    assert "| uvit | 0 |" in report and "| uvic | 0 |" in report and "**Verdict:**" in report
    results = json.loads((out / "report.json").read_text())
    for model in ("uvit", "uvic"):
        run = results[model]["0"]
        assert [s for s, _ in run["fid"]] == [2, 4] and all(np.isfinite(f) for _, f in run["fid"])
        assert run["parameters"] > 0 and run["images_per_s"] > 0
    # Same config apart from the attention: the same parameter count.
    assert results["uvit"]["0"]["parameters"] == results["uvic"]["0"]["parameters"]
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG"
    # A second invocation keeps the finished runs instead of training again.
    again = subprocess.run(
        [sys.executable, "compare.py", "compare=micro", f"reference={tmp_path / 'ref.npz'}", f"out_dir={out}"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )
    assert again.stdout.count("is finished; keeping it") == 2
