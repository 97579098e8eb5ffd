"""bench/gpu.py's tune section: the Triton kernels' block sizes per kernel, kind, dtype and head-dim bucket.

Every config that autotuning would try (`triton_tuning.candidate_configs`) is timed at the U-ViT attention shape of
its bucket, one kernel after the other (forward alone first, then dK/dV and dQ in forward+backward with the others
at their best); the fastest go into the tuning file the kernels read (`tuned_blocks.json`). The kernels are first
compiled by worker processes in parallel (into Triton's on-disk cache, at batch 1), then timed here one at a time.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
from attention import forward_backward, make_inputs
from gpu_common import Workers, collect, device_info, error_text, round_times, sync, triton_fn
from gpu_plan import DTYPES, Plan, tune_shapes

from uvit_cog.kernels import triton_tuning
from uvit_cog.kernels.triton_tuning import KERNEL_NAMES, block_d
from uvit_cog.rundir import write_text_atomic


def sweep_bucket(kind: str, dtype: str, shape: tuple[int, int, int, int], device: str, names: tuple[str, ...],
                 max_candidates: int | None, timing: tuple[int, int, int] | None) -> dict:
    """Try every candidate config of the kernels `names`, in KERNEL_NAMES order, each with the others at their best.

    The forward kernel is timed alone (no_grad), dK/dV and dQ in a forward+backward. `timing` None runs each
    candidate once untimed (to compile it: the worker processes). Returns the best config per kernel, and
    per candidate its seconds per call (the best round) or the error it raised (a config too big, say).
    """
    torch.manual_seed(0)
    qkv, grad = make_inputs(shape, DTYPES[dtype], device)
    fn = triton_fn(kind)
    configs = {name: triton_tuning.candidate_configs(name, DTYPES[dtype])[:max_candidates] for name in KERNEL_NAMES}
    best = {name: configs[name][0] for name in KERNEL_NAMES}
    results: dict[str, list] = {}
    for name in names:
        results[name] = []
        for config in configs[name]:
            table = {n: (config if n == name else best[n]) for n in KERNEL_NAMES}
            triton_tuning.use_tuned_blocks({triton_tuning.tuned_key(n, kind, DTYPES[dtype], shape[-1]): c
                                            for n, c in table.items()})
            if name == "fwd":
                def call():
                    with torch.no_grad():
                        fn(*qkv)
            else:
                def call():
                    forward_backward(fn, qkv, grad)
            try:
                if timing is None:
                    call()
                    sync(device)
                    results[name].append({"config": config, "s": None})
                else:
                    results[name].append({"config": config, "s": min(round_times(call, device, *timing))})
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: this config is out
                results[name].append({"config": config, "error": error_text(e)})
        timed = [r for r in results[name] if "error" not in r]
        if timed and timing is not None:
            best[name] = min(timed, key=lambda r: r["s"])["config"]
        elif timed:
            best[name] = timed[0]["config"]
    triton_tuning.use_tuned_blocks({})
    return {"best": best, "candidates": results}


def _compile_task(kind: str, dtype: str, shape: tuple, device: str, name: str, max_candidates: int | None) -> dict:
    """Worker: compile one kernel's candidates of one bucket (at batch 1: the same code as the timed batch)."""
    return sweep_bucket(kind, dtype, (1, *shape[1:]), device, (name,), max_candidates, None)


def tune_section(plan: Plan, workers: Workers, deadline: float, tuned_file: Path) -> dict:
    buckets = [(kind, dtype, label, shape) for kind, dtype in plan.tune_buckets for label, shape in tune_shapes(plan)]
    compiling = [[workers.submit(_compile_task, kind, dtype, shape, plan.device, name, plan.max_candidates)
                  for name in KERNEL_NAMES] for kind, dtype, _, shape in buckets]  # all in parallel, in this order
    rows, skipped, configs = [], [], {}
    for (kind, dtype, label, shape), futures in zip(buckets, compiling, strict=True):
        what = f"{kind} {dtype} BLOCK_D={block_d(shape[-1])} at {label} {shape}"
        if time.monotonic() > deadline:
            skipped.append(what)
            continue
        compile_errors = [r["error"] for r in collect(futures, deadline) if r is not None and "error" in r]
        if time.monotonic() > deadline:
            skipped.append(what)
            continue
        result = sweep_bucket(kind, dtype, shape, plan.device, KERNEL_NAMES, plan.max_candidates, plan.tune_timing)
        row = {"kind": kind, "dtype": dtype, "block_d": block_d(shape[-1]), "shape_label": label,
               "shape": list(shape), **result}
        if compile_errors:
            row["compile_errors"] = compile_errors
        rows.append(row)
        for name in KERNEL_NAMES:
            if any("error" not in r for r in result["candidates"][name]):
                configs[triton_tuning.tuned_key(name, kind, DTYPES[dtype], shape[-1])] = result["best"][name]
    for future in (f for fs in compiling for f in fs if f is not None):
        future.cancel()
    written = write_tuned_blocks(tuned_file, configs, plan)
    return {"status": "partial" if skipped else "ok", "tuned_file": str(tuned_file), "configs_written": written,
            "buckets": rows, "skipped": skipped}


def write_tuned_blocks(path: Path, configs: dict[str, dict], plan: Plan) -> int:
    """Write the tuning file the kernels read: these configs over those of an earlier file of the same GPU kind
    (none tuned: the file stays as it was)."""
    if not configs:
        return 0
    info = device_info(plan.device)
    merged = {}
    if path.exists():
        old, capability = triton_tuning.read_tuned_blocks(path)
        if capability is not None and list(capability) == info["capability"]:
            merged = old
    merged.update(configs)
    record = {
        "format": 1,
        "note": "Block sizes of the Triton kernels per kernel/kind/dtype/BLOCK_D (uvit_cog.kernels.triton_tuning."
                "tuned_key), the fastest of autotuning's configs at a U-ViT shape, written by the command below "
                "on the GPU named here; the kernels use them on GPUs of this compute capability and autotune "
                "every other bucket.",
        "command": "python bench/gpu.py" + (" --dry-run" if plan.device != "cuda" else ""),
        **info, "torch": torch.__version__, "triton": triton.__version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "configs": dict(sorted(merged.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return len(configs)
