"""bench/gpu.py: its dry run (the GPU suite's code paths on the CPU, Triton interpreted) and the pieces around it.

The dry run runs once, in a child process (TRITON_INTERPRET must be set before triton is first imported),
and each section of its report is checked by its own test. The other tests import the suite's modules and check
what the dry run cannot show: sections skip rather than overrun, the U-ViT shapes come from the presets,
failures are collected, non-finite losses are counted, and the kernels read a tuning file.
"""

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uvit_cog.kernels import tolerances, triton_tiling, triton_tuning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the suite's modules import each other as `python bench/gpu.py` does
import gpu_attention  # noqa: E402
import gpu_common  # noqa: E402
import gpu_correctness  # noqa: E402
import gpu_plan  # noqa: E402
import gpu_report  # noqa: E402
import gpu_training  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu.py")
gpu = sys.modules["gpu_suite"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(gpu)
PLAN = gpu_plan.DRY_PLAN


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(report, markdown, out folder) of one `python bench/gpu.py --dry-run`; the shipped tuning file is untouched."""
    out = tmp_path_factory.mktemp("gpu")
    shipped = _digest(triton_tuning.TUNED_BLOCKS_FILE)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _digest(triton_tuning.TUNED_BLOCKS_FILE) == shipped, "the dry run must not write the shipped tuning file"
    report = json.loads((out / "gpu_report.json").read_text())
    report["wall_s"] = seconds
    return report, (out / "gpu_report.md").read_text(), out


def test_dry_run_runs_every_section(dry_run):
    report, md, _ = dry_run
    assert report["dry_run"] and report["failures"] == []
    assert list(report["sections"]) == list(gpu_plan.SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert section.get("skipped", []) == [], name
        assert 0 < section["seconds"] <= section["budget_s"], name
    assert report["seconds"] < report["time_limit_s"]
    for heading in ("## Block sizes (tune)", "## Triton kernels against the float64 reference (correctness)",
                    "## Attention forward+backward", "## Training U-ViC against U-ViT (training)"):
        assert heading in md
    assert "error" not in md.lower().replace("max error", "")


def test_dry_run_tunes_each_bucket_and_writes_the_file_into_out(dry_run):
    report, _, out = dry_run
    tune = report["sections"]["tune"]
    assert Path(tune["tuned_file"]) == out / "tuned_blocks.json" == Path(report["tuned_file"])
    configs, capability = triton_tuning.read_tuned_blocks(out / "tuned_blocks.json")
    assert capability is None  # the CPU has none: a GPU never applies these
    expected = set()
    assert len(tune["buckets"]) == len(PLAN.tune_buckets) * len(PLAN.tune_shapes)
    for bucket, ((kind, dtype), (_, shape)) in zip(tune["buckets"], [(b, s) for b in PLAN.tune_buckets
                                                                     for s in PLAN.tune_shapes], strict=True):
        assert (bucket["kind"], bucket["dtype"], tuple(bucket["shape"])) == (kind, dtype, shape)
        for name in triton_tuning.KERNEL_NAMES:
            tried = bucket["candidates"][name]
            want = triton_tuning.candidate_configs(name, gpu_plan.DTYPES[dtype])[: PLAN.max_candidates]
            assert [c["config"] for c in tried] == want
            assert all(c["s"] > 0 for c in tried)
            assert bucket["best"][name] == min(tried, key=lambda c: c["s"])["config"]
            key = triton_tuning.tuned_key(name, kind, gpu_plan.DTYPES[dtype], shape[-1])
            assert configs[key] == bucket["best"][name]
            expected.add(key)
    assert set(configs) == expected and tune["configs_written"] == len(expected)


def test_dry_run_checks_every_kind_dtype_and_case(dry_run):
    report, _, _ = dry_run
    section = report["sections"]["correctness"]
    cases = section["cases"]
    want = gpu_correctness.check_cases(PLAN)
    key = lambda c: (c["kind"], c["dtype"], c["N"], c["M"], c["D"], c["mask"], c["sink"])  # noqa: E731
    assert sorted(map(key, cases), key=str) == sorted(map(key, want), key=str)
    assert {(c["kind"], c["dtype"]) for c in cases} == {(k, d) for k in gpu_plan.KINDS for d in PLAN.check_dtypes}
    assert {c["mask"] for c in cases} == {None, "keys", "rows"} and any(c["M"] != c["N"] for c in cases)
    assert section["passed"] == len(want) and section["failed"] == 0
    for case in cases:
        names = {"out", "dq", "dk", "dv"} | ({"dsink"} if case["sink"] else set())
        assert set(case["errors"]) == names, case
        for e in case["errors"].values():
            assert 0 <= e["max_error"] <= e["bound"]
            assert e["bound"] >= gpu_correctness.TOL[case["dtype"]] * tolerances.ERROR_FLOOR
        assert case["passed"] and case["failures"] == []


def test_dry_run_times_every_kind_against_both_sdpa_rows(dry_run):
    report, _, _ = dry_run
    section = report["sections"]["attention"]
    assert [(s["label"], tuple(s["shape"])) for s in section["shapes"]] == list(PLAN.attn_shapes)
    assert section["sdpa_backends"] == dict(PLAN.sdpa) and "14·B·H·N·M·D" in section["flops"]
    for shape in section["shapes"]:
        B, H, N, D = shape["shape"]
        assert shape["flops"] == 14 * B * H * N * N * D
        rows = {r["impl"]: r for r in shape["rows"]}
        assert list(rows) == [label for label, _ in PLAN.sdpa] + [f"{kind} triton" for kind in gpu_plan.KINDS]
        for r in rows.values():
            assert r["ms"] > 0 and r["tflops"] == pytest.approx(shape["flops"] / (r["ms"] / 1e3) / 1e12)
            assert r["throughput_x_flash"] == pytest.approx(rows["sdpa flash"]["ms"] / r["ms"])
            assert r["peak_mib"] is None  # CUDA memory only
        assert rows["sdpa flash"]["throughput_x_flash"] == 1.0


def test_dry_run_trains_both_models_in_bf16_fp16_and_compiled(dry_run):
    report, _, _ = dry_run
    section = report["sections"]["training"]
    runs = {r["run"]: r for r in section["runs"]}
    kinds = ["bfloat16 eager", "float16 eager", f"bfloat16 torch.compile({PLAN.compile_backend})"]
    assert list(runs) == [f"{label}: {kind}" for label, _ in PLAN.train_models for kind in kinds]
    assert list(section["models"]) == ["tiny text-to-image", "tiny"]  # the paper's text-to-image model first
    for name, run in runs.items():
        steps = PLAN.train_steps if "eager" in name else PLAN.compile_warmup + PLAN.compile_rounds * PLAN.round_steps
        assert run["steps"] == steps and run["note"] is None
        for model in ("U-ViT", "U-ViC"):
            m = run["models"][model]
            assert m["steps"] == steps and m["nonfinite_losses"] == 0 and m["images_per_s"] > 0
            assert math.isfinite(m["first_losses_mean"]) and math.isfinite(m["last_losses_mean"])
        ratio = run["models"]["U-ViC"]["images_per_s"] / run["models"]["U-ViT"]["images_per_s"]
        assert run["ratio_uvic_over_uvit"] == pytest.approx(ratio)


def test_sections_skip_rather_than_overrun():
    """With no time left nothing starts: every item is named as skipped and the section is "partial"."""
    past = time.monotonic() - 1.0
    workers = gpu_common.Workers(0)
    assert workers.run(lambda x: x, [(1,), (2,)], past) == [None, None]
    section = gpu_correctness.correctness_section(PLAN, workers, past, ({}, None))
    assert section["status"] == "partial" and section["cases"] == []
    assert len(section["skipped"]) == len(gpu_correctness.check_cases(PLAN))
    section = gpu_attention.attention_section(PLAN, past)
    assert section["status"] == "partial" and section["shapes"] == []
    assert len(section["skipped"]) == len(PLAN.attn_shapes)
    section = gpu_training.training_section(PLAN, past)
    assert section["status"] == "partial" and section["runs"] == [] and len(section["skipped"]) == 6
    clock = gpu.Clock(limit_s=0.0)
    skipped = gpu.run_section("attention", lambda d: pytest.fail("must not run"), clock, PLAN, gpu_plan.SECTIONS)
    assert skipped["status"] == "skipped"
    assert gpu.run_section("tune", lambda d: {}, clock, PLAN, ("training",))["status"] == "not run"
    assert clock.deadline(100.0) <= clock.start


def test_a_section_that_raises_is_reported_and_fails_the_run():
    def broken(deadline):
        raise RuntimeError("no kernel image is available")

    section = gpu.run_section("tune", broken, gpu.Clock(limit_s=60.0), PLAN, gpu_plan.SECTIONS)
    assert section["status"] == "error" and "no kernel image" in section["error"]
    assert "Traceback" in section["traceback"]
    case = dict(kind="cog", dtype="bfloat16", N=257, M=257, D=64, mask=None, sink=False, passed=False,
                failures=["dq: max error 0.1 > 0.01"])
    report = {"sections": {
        "tune": section,
        "correctness": {"status": "ok", "cases": [case]},
        "training": {"status": "ok", "runs": [{"run": "float16 eager", "models": {
            "U-ViT": {"nonfinite_losses": 0}, "U-ViC": {"nonfinite_losses": 3}}}]},
    }}
    found = gpu_report.failures(report)
    assert len(found) == 3
    assert "no kernel image" in found[0] and "dq: max error" in found[1] and "U-ViC: 3 non-finite" in found[2]


def test_uvit_attention_shapes_come_from_the_presets():
    """256 patches + the time token (+ the label token of class-conditional models, or MS-COCO's 77 text tokens);
    heads and head dim."""
    shapes = dict(gpu_plan.uvit_attention_shapes(128))
    assert shapes == {"CIFAR-10 U-ViT-S/2": (128, 8, 257, 64), "ImageNet-64 U-ViT-M/4": (128, 12, 258, 64),
                      "ImageNet-256 U-ViT-H/2": (128, 16, 258, 72),
                      "MS-COCO U-ViT-S/2 (text-to-image)": (128, 8, 334, 64)}
    assert gpu_plan.recipe_model("MS-COCO U-ViT-S/2 (text-to-image)")["text_dim"] == 768
    tuned = gpu_plan.tune_shapes(gpu_plan.GPU_PLAN)
    assert [label for label, _ in tuned] == ["CIFAR-10 U-ViT-S/2", "ImageNet-256 U-ViT-H/2"]


def test_nonfinite_losses_are_counted_and_fp16_scales():
    torch.manual_seed(0)
    kwargs = dict(sample_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=2, num_heads=2)
    trainer = gpu_training.SuiteTrainer("cog", kwargs, 2, torch.device("cpu"), torch.float16, None)
    assert trainer.scaler.is_enabled()
    trainer.step()
    with torch.no_grad():
        trainer.model.decoder_pred.bias.fill_(float("nan"))
    trainer.step()
    trainer.step()
    summary = trainer.summary()
    assert summary["steps"] == 3 and summary["nonfinite_losses"] == 2
    bf16 = gpu_training.SuiteTrainer("cog", kwargs, 2, torch.device("cpu"), torch.bfloat16, None)
    assert not bf16.scaler.is_enabled()


def test_kernels_read_a_tuning_file(tmp_path, monkeypatch):
    """The shipped file parses; a tuned bucket launches its config (plain kernel), others and other GPUs don't."""
    configs, capability = triton_tuning.read_tuned_blocks()
    for key, config in configs.items():
        kernel, kind, dtype, bucket = key.split("/")
        assert kernel in triton_tuning.KERNEL_NAMES and kind in gpu_plan.KINDS and dtype in gpu_plan.DTYPES
        assert int(bucket) >= 16 and set(config) == set(triton_tuning.CONFIG_FIELDS)
    assert capability is None or len(capability) == 2
    assert triton_tuning.read_tuned_blocks(tmp_path / "absent.json") == ({}, None)
    bad = tmp_path / "tuned_blocks.json"
    bad.write_text(json.dumps({"configs": {"fwd/cog/bfloat16/64": {"BLOCK_M": 64}}}))
    with pytest.raises(ValueError, match=r"tuned_blocks\.json.*bench/gpu\.py"):
        triton_tuning.read_tuned_blocks(bad)
    q = torch.randn(1, 2, 8, 72, dtype=torch.bfloat16)
    config = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    key = triton_tuning.tuned_key("fwd", "cog", torch.bfloat16, 72)
    assert key == "fwd/cog/bfloat16/128"
    default = triton_tiling.KERNELS["fwd"][2]  # the block arguments of the autotuned (or fixed) launcher
    try:
        triton_tuning.use_tuned_blocks({key: config})
        assert triton_tiling._launch("fwd", q, "cog") == (triton_tiling._tiled_fwd, config)
        assert triton_tiling._launch("fwd", q, "softpick")[1] is default  # no entry: the default
        assert triton_tiling._launch("fwd", q[..., :64], "cog")[1] is default  # another bucket
        monkeypatch.setattr(triton_tuning, "_capability", lambda device: (8, 0))
        triton_tuning.use_tuned_blocks({key: config}, (9, 0))
        assert triton_tiling._launch("fwd", q, "cog")[1] is default  # tuned on another GPU kind
    finally:
        triton_tuning.use_tuned_blocks({})
