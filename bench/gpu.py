"""Everything that needs a CUDA GPU, as one command of at most 8 minutes, with a report.

    python bench/gpu.py              # one H100/H200: runs/gpu/gpu_report.{json,md}, uvit_cog/kernels/tuned_blocks.json
    python bench/gpu.py --dry-run    # the same code paths on the CPU at tiny shapes, Triton interpreted (< 1 min)

Sections, in this order, each under its own time limit (the plans: gpu_plan.py): what does not fit is skipped and
named in the report (the suite never overruns), and a section that raises is reported as an error while the next
runs. Each is a module of its own, whose docstring says what it measures:

  tune         gpu_tune.py: the Triton block sizes, written to uvit_cog/kernels/tuned_blocks.json
  correctness  gpu_correctness.py: the Triton kernels of every kind against the float64 reference
  attention    gpu_attention.py: forward+backward of every fused kind against SDPA's flash and cuDNN backends
  training     gpu_training.py: U-ViC-S/2 against U-ViT-S/2, train.py's step, bf16, fp16 and torch.compile

and gpu_report.py writes the report (gpu_common.py: timing, worker processes). The dry run: Triton under
TRITON_INTERPRET=1 (fp32 and fp16: the interpreter does not emulate bf16 faithfully), SDPA's math backend in place
of flash and cuDNN, a tiny U-ViT for a few steps, torch.compile's "eager" backend, two configs per kernel in two
buckets, and the tuning file written into --out only. tests/test_gpu_suite.py runs it. Exit status 1 when a check
fails, a loss is non-finite or a section errs.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:  # chosen when triton is first imported, which importing torch's users does
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
from gpu_attention import attention_section
from gpu_common import Workers, device_info, error_text
from gpu_correctness import correctness_section
from gpu_plan import DRY_PLAN, GPU_PLAN, SECTIONS, Plan
from gpu_report import failures, markdown
from gpu_training import training_section
from gpu_tune import tune_section

from uvit_cog.kernels import triton_tuning
from uvit_cog.rundir import write_text_atomic


@dataclass
class Clock:
    """The run's deadline, and each section's: its budget from its start, never past the run's."""

    limit_s: float
    start: float = field(default_factory=time.monotonic)

    def deadline(self, budget_s: float) -> float:
        return min(time.monotonic() + budget_s, self.start + self.limit_s)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def run_section(name: str, fn: Callable[[float], dict], clock: Clock, plan: Plan, sections: tuple[str, ...]) -> dict:
    """One section under its deadline, timed; a section not asked for, or with no time left, is skipped."""
    budget = plan.budgets_s[name]
    if name not in sections:
        return {"status": "not run", "note": "not in --sections"}
    if clock.elapsed() >= clock.limit_s:
        return {"status": "skipped", "note": "time limit of the run reached before it"}
    print(f"[{clock.elapsed():6.1f} s] {name} (budget {budget:.0f} s)", flush=True)
    start = time.monotonic()
    try:
        result = fn(clock.deadline(budget))
    except Exception as e:  # noqa: BLE001 - one section's failure must not cost the others
        result = {"status": "error", "error": error_text(e), "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.monotonic() - start
    result["budget_s"] = budget
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu"), help="folder of gpu_report.{json,md}")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores - 2, at most 14; "
                        "dry run 1; 0: inline)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default 450)")
    parser.add_argument("--tuned-file", type=Path, default=None,
                        help="where the tune section writes (default: the shipped uvit_cog/kernels/tuned_blocks.json; "
                             "dry run: OUT/tuned_blocks.json)")
    args = parser.parse_args()
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA GPU here; `python bench/gpu.py --dry-run` runs the same code on "
                         "the CPU")
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.jobs is not None:
        plan = dataclasses.replace(plan, jobs=args.jobs)
    if args.time_limit is not None:
        plan = dataclasses.replace(plan, time_limit_s=args.time_limit)
    shipped = triton_tuning.TUNED_BLOCKS_FILE
    tuned_file = args.tuned_file or (args.out / "tuned_blocks.json" if args.dry_run else shipped)
    clock = Clock(plan.time_limit_s)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"suite": "bench/gpu.py", "command": " ".join(["python bench/gpu.py", *sys.argv[1:]]),
              "dry_run": args.dry_run, **device_info(plan.device), "torch": torch.__version__,
              "triton": triton.__version__, "jobs": plan.jobs, "time_limit_s": plan.time_limit_s,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sections": {}}
    workers = Workers(plan.jobs if {"tune", "correctness"} & set(sections) else 0)
    try:
        report["sections"]["tune"] = run_section(
            "tune", lambda d: tune_section(plan, workers, d, tuned_file), clock, plan, sections)
        tuned = triton_tuning.read_tuned_blocks(tuned_file)  # ({}, None) without a file: every kernel autotunes
        triton_tuning.use_tuned_blocks(*tuned)  # what every later section launches
        report["tuned_file"] = str(tuned_file)
        report["sections"]["correctness"] = run_section(
            "correctness", lambda d: correctness_section(plan, workers, d, tuned), clock, plan, sections)
    finally:
        workers.close()  # before training: its compile wants the cores, and the workers hold GPU memory
    report["sections"]["attention"] = run_section("attention", lambda d: attention_section(plan, d), clock, plan,
                                                  sections)
    report["sections"]["training"] = run_section("training", lambda d: training_section(plan, d), clock, plan,
                                                 sections)
    report["seconds"] = clock.elapsed()
    report["failures"] = failures(report)
    write_text_atomic(args.out / "gpu_report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text_atomic(args.out / "gpu_report.md", markdown(report))
    if tuned_file.exists() and tuned_file.resolve() != (args.out / "tuned_blocks.json").resolve():
        write_text_atomic(args.out / "tuned_blocks.json", tuned_file.read_text())  # the report folder holds it all
    print(f"[{clock.elapsed():6.1f} s] wrote {args.out / 'gpu_report.json'} and {args.out / 'gpu_report.md'}; "
          f"{len(report['failures'])} failures")
    for line in report["failures"][:20]:
        print("  " + line)
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
