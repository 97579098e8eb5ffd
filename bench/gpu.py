"""Everything that needs a CUDA GPU, as one command of at most 8 minutes, with a report.

    python bench/gpu.py              # one H100/H200: runs/gpu/gpu_report.{json,md}, uvit_cog/kernels/tuned_blocks.json
    python bench/gpu.py --dry-run    # the same code paths on the CPU at tiny shapes, Triton interpreted (< 1 min)

Sections, in this order, each under its own time limit: what does not fit is skipped and named in the
report (the suite never overruns), and a section that raises is reported as an error while the next runs.

  tune         Triton block sizes. Every config that autotuning would try (`triton_cog.candidate_configs`),
               per kernel (forward, dK/dV, dQ), kind, dtype and head-dim bucket (BLOCK_D 64 and 128), timed
               at the U-ViT attention shape of that bucket, one kernel after the other (forward alone first,
               then dK/dV and dQ in forward+backward with the others at their best). The fastest go into
               uvit_cog/kernels/tuned_blocks.json, which the kernels launch instead of autotuning (on a GPU of the
               same compute capability). The kernels are first compiled by worker processes in parallel
               (into Triton's on-disk cache, at batch 1), then timed here one at a time.
  correctness  The Triton kernels of every kind against the float64 reference (`reference_attention`):
               fp32, fp16, bf16; N ∈ {257, 1025, 4097} × D ∈ {64, 72, 128}; a key-padding mask and a
               per-row mask with a row that keeps no key, both at M ≠ N; softmax1 with a learned sink.
               Output and dq, dk, dv (and d sink): max error over the largest reference value (or 1e-2),
               against 1e-4 (fp32), 2e-2 (fp16), 3e-2 (bf16); a non-finite value is a failure. Run by the
               worker processes (nothing is timed).
  attention    Forward+backward of every fused kind (Triton) against SDPA restricted to its flash backend
               and to its cuDNN backend, bf16, at the attention shapes of the U-ViT recipes (derived from
               `UViTModel` presets: CIFAR-10 S/2, ImageNet-64 M/4, ImageNet-256 H/2, batch 128, the recipes'
               per-GPU batch) and at N = 4097: time, TFLOP/s and peak memory, each as a ratio to flash.
               FLOPs: 4·B·H·N·M·D forward (two matmuls), 2.5× that backward (five), so 14·B·H·N·M·D per
               forward+backward, the count FlashAttention's benchmarks use. Implementations interleaved
               in rounds; medians.
  training     U-ViC-S/2 against U-ViT-S/2, batch 128, 32×32, train.py's step (bench/train_throughput.py):
               300 steps of each in bf16 autocast and in fp16 autocast with a GradScaler, the two models
               interleaved in rounds of 50 steps, counting non-finite losses; images/s is the median over
               the rounds after the first. Then images/s with torch.compile (bf16).

The dry run: Triton under TRITON_INTERPRET=1 (fp32 and fp16: the interpreter does not emulate bf16
faithfully), SDPA's math backend in place of flash and cuDNN, a tiny U-ViT for a few steps, torch.compile's
"eager" backend, two configs per kernel in two buckets, and the tuning file written into --out only.
tests/test_gpu_suite.py runs it. Exit status 1 when a check fails, a loss is non-finite or a section errs.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:  # chosen when triton is first imported, which importing torch's users does
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import dataclasses
import json
import math
import multiprocessing
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from attention import forward_backward, make_inputs
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from train_throughput import Trainer

from uvit_cog import PRESETS, UViTModel, attention_variants
from uvit_cog.attention import KERNEL_KINDS, reference_attention
from uvit_cog.rundir import write_text_atomic
from uvit_cog.training import GlobalBatchRandom, diffusion_loss, update_ema

KINDS = KERNEL_KINDS
KERNEL_NAMES = ("fwd", "dkdv", "dq")  # the order they are tuned in
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 3e-2}  # max error / max |reference|, as tests/test_kernels.py
ERROR_FLOOR = 1e-2  # errors are relative to max(max |reference|, this)
FLOPS_NOTE = "4·B·H·N·M·D forward, 2.5× that backward: 14·B·H·N·M·D per forward+backward"
SECTIONS = ("tune", "correctness", "attention", "training")

# The U-ViT recipes whose attention shapes are timed: preset and dataset arguments (conf/experiment/*.yaml).
RECIPES = {
    "CIFAR-10 U-ViT-S/2": dict(preset="uvit-small", sample_size=32, patch_size=2, in_channels=3, num_classes=0),
    "ImageNet-64 U-ViT-M/4": dict(preset="uvit-mid", sample_size=64, patch_size=4, in_channels=3, num_classes=1000),
    "ImageNet-256 U-ViT-H/2": dict(preset="uvit-huge", sample_size=32, patch_size=2, in_channels=4, num_classes=1000),
}
TRAIN_RECIPE = "CIFAR-10 U-ViT-S/2"


@dataclass(frozen=True)
class Plan:
    """What one run does and how long each part may take: the GPU suite, or its tiny dry run on the CPU."""

    name: str
    device: str
    jobs: int  # worker processes for untimed work (0: run it inline)
    time_limit_s: float  # the whole run
    budgets_s: dict[str, float]  # per section
    tune_buckets: tuple[tuple[str, str], ...]  # (kind, dtype), each at every tune shape
    tune_shapes: tuple[tuple[str, tuple[int, int, int, int]], ...] | None  # None: one U-ViT shape per BLOCK_D
    max_candidates: int | None  # configs per kernel (None: all that autotuning tries)
    tune_timing: tuple[int, int, int]  # (warm-up calls, rounds, calls per round); the best round counts
    check_dtypes: tuple[str, ...]
    check_lengths: tuple[int, ...]  # N = M, without a mask, at every head dim
    check_head_dims: tuple[int, ...]
    check_masked: tuple[tuple[int, int, int, str], ...]  # (N, M, D, mask)
    check_heads: int
    attn_dtype: str
    attn_batch: int
    attn_shapes: tuple[tuple[str, tuple[int, int, int, int]], ...] | None  # None: the U-ViT ones + LONG_SHAPE
    attn_timing: tuple[int, int, int]  # (warm-up calls, rounds, calls per round); the median round counts
    sdpa: tuple[tuple[str, str], ...]  # (label, SDPBackend member)
    train_model: dict | None  # None: the CIFAR-10 U-ViT-S/2 recipe
    train_batch: int
    train_steps: int
    round_steps: int
    compile_backend: str
    compile_warmup: int
    compile_rounds: int
    compile_reserve_s: float  # start the compiled runs only with this much time left


LONG_SHAPE = ("N = 4097, H = 8, D = 64", (8, 8, 4097, 64))

GPU_PLAN = Plan(
    name="gpu", device="cuda", jobs=max(1, min(14, (os.cpu_count() or 2) - 2)), time_limit_s=450.0,
    budgets_s={"tune": 150.0, "correctness": 75.0, "attention": 45.0, "training": 450.0},  # training: the rest
    tune_buckets=tuple((kind, dtype) for dtype in ("bfloat16", "float16", "float32") for kind in KINDS),
    tune_shapes=None, max_candidates=None, tune_timing=(2, 3, 5),
    check_dtypes=("float32", "float16", "bfloat16"), check_lengths=(257, 1025, 4097), check_head_dims=(64, 72, 128),
    check_masked=((1025, 257, 72, "keys"), (257, 1025, 128, "rows"), (4097, 1025, 64, "rows")), check_heads=2,
    attn_dtype="bfloat16", attn_batch=128, attn_shapes=None, attn_timing=(3, 7, 10),
    sdpa=(("sdpa flash", "FLASH_ATTENTION"), ("sdpa cudnn", "CUDNN_ATTENTION")),
    train_model=None, train_batch=128, train_steps=300, round_steps=50,
    compile_backend="inductor", compile_warmup=3, compile_rounds=3, compile_reserve_s=150.0,
)

DRY_PLAN = Plan(
    name="dry-run", device="cpu", jobs=1, time_limit_s=600.0,
    budgets_s={"tune": 150.0, "correctness": 150.0, "attention": 150.0, "training": 150.0},
    tune_buckets=(("cog", "float32"), ("softmax1", "float16")),
    tune_shapes=(("tiny", (1, 1, 33, 24)),), max_candidates=2, tune_timing=(0, 1, 1),
    check_dtypes=("float32", "float16"), check_lengths=(33,), check_head_dims=(24,),
    check_masked=((33, 17, 16, "keys"), (17, 33, 24, "rows")), check_heads=2,
    attn_dtype="float16", attn_batch=1,
    attn_shapes=(("tiny stand-in for CIFAR-10 U-ViT-S/2", (1, 1, 33, 16)),
                 ("tiny stand-in for N = 4097", (1, 1, 65, 16))),
    attn_timing=(0, 1, 1), sdpa=(("sdpa flash", "MATH"), ("sdpa cudnn", "MATH")),
    train_model=dict(sample_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=2, num_heads=2),
    train_batch=4, train_steps=2, round_steps=1,
    compile_backend="eager", compile_warmup=1, compile_rounds=1, compile_reserve_s=0.0,
)


# ----------------------------------------------------------------------------------------------------------
# shapes, timing, worker processes


def uvit_attention_shapes(batch: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(recipe, (B, H, N, D)) of the attention in each of `RECIPES`, read off the model built on the meta device:
    N counts the patches and the time token (and the label token of class-conditional models)."""
    shapes = []
    for label, recipe in RECIPES.items():
        args = dict(recipe)
        with torch.device("meta"):
            model = UViTModel.from_preset(args.pop("preset"), **args)
        heads = model.mid_block.attn.num_heads
        shapes.append((label, (batch, heads, model.pos_embed.shape[1], model.config.embed_dim // heads)))
    return shapes


def block_d(head_dim: int) -> int:
    """The kernels' head-dim bucket (their BLOCK_D), as their tuning keys name it."""
    return int(_triton().tuned_key("fwd", "cog", torch.float16, head_dim).rsplit("/", 1)[1])


def tune_shapes(plan: Plan) -> tuple[tuple[str, tuple[int, int, int, int]], ...]:
    """The plan's tune shapes, or the first U-ViT attention shape of each head-dim bucket."""
    if plan.tune_shapes:
        return plan.tune_shapes
    by_bucket: dict[int, tuple] = {}
    for label, shape in uvit_attention_shapes(plan.attn_batch):
        by_bucket.setdefault(block_d(shape[-1]), (label, shape))
    return tuple(by_bucket.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_times(fn: Callable[[], object], device: str, warmup: int, rounds: int, calls: int) -> list[float]:
    """Seconds per call of `fn` in each of `rounds` rounds of `calls` back-to-back calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    return times


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """How far one call of `fn` raises the CUDA memory in use above what was allocated before it (None on the CPU)."""
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def _worker_init() -> None:
    torch.set_num_threads(1)  # workers compile and check kernels: one thread each leaves the cores to the others


class Workers:
    """Spawned worker processes (CUDA needs spawn, not fork) for work that is not timed; jobs=0 runs it inline."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) if jobs else None

    def submit(self, fn: Callable, *args) -> Future | None:
        """fn(*args) in a worker; None without workers (jobs=0, or the pool broke)."""
        if self.executor is None:
            return None
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool:
            self.close()
            return None

    def run(self, fn: Callable, tasks: list[tuple], deadline: float) -> list:
        """fn(*task) for each task, or None for those not finished (inline: not started) by `deadline`.
        Inline too when the pool broke (a worker died): the work still gets done, only slower."""
        if self.executor is not None:
            try:
                return collect([self.executor.submit(fn, *task) for task in tasks], deadline)
            except BrokenProcessPool:
                self.close()
        return [fn(*task) if time.monotonic() < deadline else None for task in tasks]

    def close(self, grace_s: float = 10.0) -> None:
        """Cancel what has not started; give running tasks `grace_s` seconds, then end their processes."""
        if self.executor is None:
            return
        processes = list((getattr(self.executor, "_processes", None) or {}).values())  # no public handle
        self.executor.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + grace_s
        for process in processes:
            process.join(timeout=max(0.0, end - time.monotonic()))
            if process.is_alive():  # e.g. a compile that hangs: the suite must not wait past its limit
                process.terminate()
        self.executor = None


def collect(futures: list[Future | None], deadline: float) -> list:
    """The futures' results in order; None for each one not done by `deadline` (the pending ones are cancelled)
    or never submitted. A task that raised gives {"error": ...}."""
    results = []
    for future in futures:
        if future is None:
            results.append(None)
            continue
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            results.append(None)
            future.cancel()
        except Exception as e:  # noqa: BLE001 - a worker that died or a task that raised is reported, not fatal
            results.append({"error": f"{type(e).__name__}: {e}"})
    return results


def _triton():
    """The Triton kernels module, imported on first use (after TRITON_INTERPRET is settled)."""
    from uvit_cog.kernels import triton_cog

    return triton_cog


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


# ----------------------------------------------------------------------------------------------------------
# tune: block sizes per kernel, kind, dtype and head-dim bucket


def triton_fn(kind: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda q, k, v: attention_variants[kind](q, k, v, impl="triton")


def candidates(kind: str, dtype: str, max_candidates: int | None) -> dict[str, list[dict]]:
    """The configs to try per kernel name: autotuning's (`candidate_configs`), the first `max_candidates`."""
    tc = _triton()
    return {name: tc.candidate_configs(name, DTYPES[dtype])[:max_candidates] for name in KERNEL_NAMES}


def sweep_bucket(kind: str, dtype: str, shape: tuple[int, int, int, int], device: str, names: tuple[str, ...],
                 max_candidates: int | None, timing: tuple[int, int, int] | None) -> dict:
    """Try every candidate config of the kernels `names`, in KERNEL_NAMES order, each with the others at their best.

    The forward kernel is timed alone (no_grad), dK/dV and dQ in a forward+backward. `timing` None runs each
    candidate once untimed (to compile it: the worker processes). Returns the best config per kernel, and
    per candidate its seconds per call (the best round) or the error it raised (a config too big, say).
    """
    tc = _triton()
    torch.manual_seed(0)
    qkv, grad = make_inputs(shape, DTYPES[dtype], device)
    fn = triton_fn(kind)
    configs = candidates(kind, dtype, max_candidates)
    best = {name: configs[name][0] for name in KERNEL_NAMES}
    results: dict[str, list] = {}
    for name in names:
        results[name] = []
        for config in configs[name]:
            table = {n: (config if n == name else best[n]) for n in KERNEL_NAMES}
            tc.use_tuned_blocks({tc.tuned_key(n, kind, DTYPES[dtype], shape[-1]): c for n, c in table.items()})
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
                results[name].append({"config": config, "error": _error_text(e)})
        timed = [r for r in results[name] if "error" not in r]
        if timed and timing is not None:
            best[name] = min(timed, key=lambda r: r["s"])["config"]
        elif timed:
            best[name] = timed[0]["config"]
    tc.use_tuned_blocks({})
    return {"best": best, "candidates": results}


def _compile_task(kind: str, dtype: str, shape: tuple, device: str, name: str, max_candidates: int | None) -> dict:
    """Worker: compile one kernel's candidates of one bucket (at batch 1: the same code as the timed batch)."""
    return sweep_bucket(kind, dtype, (1, *shape[1:]), device, (name,), max_candidates, None)


def tune_section(plan: Plan, workers: Workers, deadline: float, tuned_file: Path) -> dict:
    tc = _triton()
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
                configs[tc.tuned_key(name, kind, DTYPES[dtype], shape[-1])] = result["best"][name]
    for future in (f for fs in compiling for f in fs if f is not None):
        future.cancel()
    written = write_tuned_blocks(tuned_file, configs, plan)
    return {"status": "partial" if skipped else "ok", "tuned_file": str(tuned_file), "configs_written": written,
            "buckets": rows, "skipped": skipped}


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"device": f"cpu ({platform.processor() or platform.machine()}), Triton interpreted", "capability": None}
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}


def write_tuned_blocks(path: Path, configs: dict[str, dict], plan: Plan) -> int:
    """Write the tuning file the kernels read: these configs over those of an earlier file of the same GPU kind
    (none tuned: the file stays as it was)."""
    if not configs:
        return 0
    tc = _triton()
    info = device_info(plan.device)
    merged = {}
    if path.exists():
        old, capability = tc.read_tuned_blocks(path)
        if capability is not None and list(capability) == info["capability"]:
            merged = old
    merged.update(configs)
    record = {
        "format": 1,
        "note": "Block sizes of the Triton kernels per kernel/kind/dtype/BLOCK_D (uvit_cog.kernels.triton_cog."
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


# ----------------------------------------------------------------------------------------------------------
# correctness: the kernels against the float64 reference


def check_cases(plan: Plan) -> list[dict]:
    """Every case of the correctness section, grouped so that the cases of one group share compiled kernels."""
    cases = []
    for kind in KINDS:
        for dtype in plan.check_dtypes:
            shapes = [(n, n, d, None) for d in plan.check_head_dims for n in plan.check_lengths]
            for n, m, d, mask in shapes + list(plan.check_masked):
                cases.append(dict(kind=kind, dtype=dtype, N=n, M=m, D=d, mask=mask, sink=False))
            if kind == "softmax1":
                n, m, d, mask = plan.check_masked[0]
                cases.append(dict(kind=kind, dtype=dtype, N=n, M=m, D=d, mask=mask, sink=True))
    for i, case in enumerate(cases):
        case["seed"] = i
    return cases


def case_inputs(case: dict, heads: int, device: str):
    """q as a strided (B, N, H, D) view like `Attention`'s, k, v, the output gradient and the mask, from the seed."""
    g = torch.Generator().manual_seed(case["seed"])
    dtype, n, m, d = DTYPES[case["dtype"]], case["N"], case["M"], case["D"]
    q = torch.randn(1, n, heads, d, generator=g).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(1, heads, m, d, generator=g).to(device, dtype) for _ in range(2))
    grad = torch.randn(1, heads, n, d, generator=g).to(device, dtype)
    mask = None
    if case["mask"] == "keys":  # key padding, broadcast over heads and queries
        mask = (torch.arange(m) < m - m // 3).view(1, 1, 1, m)
    elif case["mask"] == "rows":  # per head and query; query n // 2 of head 0 keeps no key
        mask = torch.rand(1, heads, n, m, generator=g) > 0.5
        mask[0, 0, n // 2] = False
    return q, k, v, grad, None if mask is None else mask.to(device)


def check_case(case: dict, heads: int, device: str) -> dict:
    """Output and gradients of the Triton kernel of one case against `reference_attention` in float64."""
    q, k, v, grad, mask = case_inputs(case, heads, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    params = {}
    if case["sink"]:
        params["sink"] = torch.linspace(0.7, -1.5, heads, device=device).requires_grad_()
        inputs.append(params["sink"])
    out = attention_variants[case["kind"]](q, k, v, attn_mask=mask, impl="triton", **params)
    got = (out, *torch.autograd.grad(out, inputs, grad))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_params = {"sink": ref_inputs[3]} if case["sink"] else {}
    ref = reference_attention(case["kind"], *ref_inputs[:3], mask, **ref_params)
    want = (ref, *torch.autograd.grad(ref, ref_inputs, grad.double()))
    errors, failures = {}, []
    tol = TOL[case["dtype"]]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsink"), got, want, strict=False):
        a, b = a.detach().double(), b.detach()
        if not torch.isfinite(a).all():
            failures.append(f"{name}: non-finite values")
            continue
        bound = tol * max(b.abs().max().item(), ERROR_FLOOR)
        errors[name] = {"max_error": (a - b).abs().max().item(), "bound": bound}
        if errors[name]["max_error"] > bound:
            failures.append(f"{name}: max error {errors[name]['max_error']:.3g} > {bound:.3g}")
    if case["mask"] == "rows" and not (torch.all(out[0, 0, case["N"] // 2] == 0)
                                       and torch.all(got[1][0, 0, case["N"] // 2] == 0)):
        failures.append("the row that keeps no key is not zero (output or dq)")
    return {**case, "passed": not failures, "errors": errors, "failures": failures}


def _check_task(cases: list[dict], heads: int, device: str, tuned: tuple[dict, tuple | None]) -> list[dict]:
    """Worker: check a group of cases with the kernels launching the tuned configs."""
    _triton().use_tuned_blocks(*tuned)
    results = []
    for case in cases:
        try:
            results.append(check_case(case, heads, device))
        except Exception as e:  # noqa: BLE001 - a case that raises is a failed case
            results.append({**case, "passed": False, "errors": {}, "failures": [_error_text(e)]})
    return results


def correctness_section(plan: Plan, workers: Workers, deadline: float, tuned: tuple[dict, tuple | None]) -> dict:
    """Every case of `check_cases`, with the kernels launching `tuned` (the tuning file's configs)."""
    groups: dict[tuple, list[dict]] = {}
    for case in check_cases(plan):
        groups.setdefault((case["kind"], case["dtype"], case["D"], case["mask"]), []).append(case)
    tasks = [(cases, plan.check_heads, plan.device, tuned) for cases in groups.values()]
    done, skipped = [], []
    for task, result in zip(tasks, workers.run(_check_task, tasks, deadline), strict=True):
        if result is None:
            skipped += task[0]
        elif isinstance(result, dict):  # the worker died
            done += [{**case, "passed": False, "errors": {}, "failures": [result["error"]]} for case in task[0]]
        else:
            done += result
    failed = [c for c in done if not c["passed"]]
    return {"status": "partial" if skipped else "ok", "tolerances": TOL, "error_floor": ERROR_FLOOR,
            "heads": plan.check_heads, "passed": len(done) - len(failed), "failed": len(failed),
            "skipped": [_case_label(c) for c in skipped], "cases": done}


def _case_label(case: dict) -> str:
    sink = " learned sink" if case["sink"] else ""
    return f"{case['kind']} {case['dtype']} N={case['N']} M={case['M']} D={case['D']} mask={case['mask']}{sink}"


# ----------------------------------------------------------------------------------------------------------
# attention: throughput and memory against SDPA's flash and cuDNN backends


def sdpa_fn(backend: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    member = getattr(SDPBackend, backend)

    def fn(q, k, v):
        with sdpa_kernel(member):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def attention_shape(plan: Plan, impls: dict[str, Callable], label: str, shape: tuple[int, int, int, int]) -> dict:
    """Time, TFLOP/s and peak memory of one forward+backward of each implementation at one shape, and their
    ratios to the first SDPA backend's; an implementation that raises on its first call is "unavailable"."""
    B, H, N, D = shape
    flops = 14 * B * H * N * N * D
    torch.manual_seed(0)
    qkv, grad = make_inputs(shape, DTYPES[plan.attn_dtype], plan.device)
    calls: dict[str, Callable[[], None]] = {name: (lambda fn=fn: forward_backward(fn, qkv, grad))
                                            for name, fn in impls.items()}
    rows = {name: {"impl": name} for name in impls}
    warmup, rounds, per_round = plan.attn_timing
    available = {}
    for name, call in calls.items():  # the first call compiles, and tells an unavailable backend
        try:
            for _ in range(1 + warmup):
                call()
            sync(plan.device)
            available[name] = call
        except Exception as e:  # noqa: BLE001 - e.g. "No available kernel" for this shape and dtype
            rows[name]["unavailable"] = _error_text(e)
    times: dict[str, list[float]] = {name: [] for name in available}
    for _ in range(rounds):  # interleaved: a change of clock or load hits every implementation alike
        for name, call in available.items():
            times[name] += round_times(call, plan.device, 0, 1, per_round)
    for name, call in available.items():
        seconds, peak = statistics.median(times[name]), peak_bytes(call, plan.device)
        rows[name].update(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                          peak_mib=None if peak is None else peak / 2**20)
    base = rows[plan.sdpa[0][0]]
    for row in rows.values():
        if "ms" in row and "ms" in base:
            row["throughput_x_flash"] = base["ms"] / row["ms"]
            if row["peak_mib"] is not None and base["peak_mib"]:
                row["peak_x_flash"] = row["peak_mib"] / base["peak_mib"]
    return {"label": label, "shape": list(shape), "flops": flops, "rows": list(rows.values())}


def attention_section(plan: Plan, deadline: float) -> dict:
    shapes = plan.attn_shapes or (*uvit_attention_shapes(plan.attn_batch), LONG_SHAPE)
    impls = {label: sdpa_fn(backend) for label, backend in plan.sdpa}
    impls |= {f"{kind} triton": triton_fn(kind) for kind in KINDS}
    results, skipped = [], []
    for label, shape in shapes:
        if time.monotonic() > deadline:
            skipped.append(f"{label} {shape}")
        else:
            results.append(attention_shape(plan, impls, label, shape))
    return {"status": "partial" if skipped else "ok", "dtype": plan.attn_dtype, "flops": FLOPS_NOTE,
            "sdpa_backends": dict(plan.sdpa), "shapes": results, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------
# training: U-ViC against U-ViT


class SuiteTrainer(Trainer):
    """bench/train_throughput.py's trainer (train.py's step) with fp16's GradScaler, the loss kept on the device,
    non-finite losses counted, and torch.compile through a chosen backend."""

    def __init__(self, attention_type: str, model_kwargs: dict, batch: int, device: torch.device,
                 dtype: torch.dtype, compile_backend: str | None) -> None:
        super().__init__(attention_type, model_kwargs, batch, device, dtype, compile_model=False)
        if compile_backend:
            self.forward = torch.compile(self.model, backend=compile_backend)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.losses: list[Tensor] = []

    def step(self) -> None:
        rnd = GlobalBatchRandom(0, self.step_index, 0, self.batch, self.batch, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = diffusion_loss(self.forward, self.objective, self.x0, None, rnd)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, 0.9999)
        self.losses.append(loss.detach().float())
        self.step_index += 1

    def summary(self) -> dict:
        losses = torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)
        head, tail = losses[:10], losses[-10:]
        return {"steps": len(losses), "nonfinite_losses": int((~torch.isfinite(losses)).sum()),
                "first_losses_mean": head.mean().item() if len(head) else None,
                "last_losses_mean": tail.mean().item() if len(tail) else None}


def train_run(plan: Plan, model_kwargs: dict, dtype: str, compile_backend: str | None, deadline: float) -> dict:
    """U-ViT and U-ViC stepping in alternating rounds; images/s per model from the rounds after the first."""
    device = torch.device(plan.device)
    if compile_backend:
        steps, round_steps = plan.compile_warmup + plan.compile_rounds * plan.round_steps, plan.round_steps
    else:
        steps, round_steps = plan.train_steps, plan.round_steps
    trainers = {"U-ViT": SuiteTrainer("softmax", model_kwargs, plan.train_batch, device, DTYPES[dtype],
                                      compile_backend),
                "U-ViC": SuiteTrainer("cog", model_kwargs, plan.train_batch, device, DTYPES[dtype], compile_backend)}
    first = plan.compile_warmup if compile_backend else round_steps
    rounds = [first] + [round_steps] * math.ceil((steps - first) / round_steps)
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    first_round_s: dict[str, float] = {}
    note = None
    for i, n in enumerate(rounds):
        if time.monotonic() > deadline:
            note = f"stopped after {sum(rounds[:i])} of {steps} steps: time limit"
            break
        for name, trainer in trainers.items():
            seconds = min(round_times(trainer.step, plan.device, 0, 1, n)) * n
            if i == 0:
                first_round_s[name] = seconds
            else:
                rates[name].append(n * plan.train_batch / seconds)
    models = {name: {**trainer.summary(), "first_round_s": first_round_s.get(name),
                     "images_per_s": statistics.median(rates[name]) if rates[name] else None}
              for name, trainer in trainers.items()}
    uvit, uvic = models["U-ViT"]["images_per_s"], models["U-ViC"]["images_per_s"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else None  # both models together
    del trainers
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return {"dtype": dtype, "compile": compile_backend, "steps": steps, "round_steps": round_steps, "models": models,
            "ratio_uvic_over_uvit": uvic / uvit if uvic and uvit else None, "peak_gib": peak, "note": note}


def training_section(plan: Plan, deadline: float) -> dict:
    if plan.train_model is None:
        recipe = dict(RECIPES[TRAIN_RECIPE])
        model_kwargs = {**PRESETS[recipe.pop("preset")], **recipe}
    else:
        model_kwargs = dict(plan.train_model)
    runs, skipped = [], []
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for dtype, compile_backend in (("bfloat16", None), ("float16", None), ("bfloat16", plan.compile_backend)):
        what = f"{dtype}" + (f" torch.compile({compile_backend})" if compile_backend else " eager")
        reserve = plan.compile_reserve_s if compile_backend else 0.0
        if time.monotonic() > deadline - reserve:
            skipped.append(f"{what}: under {reserve:.0f} s left" if reserve else what)
            continue
        try:
            runs.append({"run": what, **train_run(plan, model_kwargs, dtype, compile_backend, deadline)})
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on this setup: reported, next run goes on
            runs.append({"run": what, "error": _error_text(e), "traceback": traceback.format_exc()[-3000:]})
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    partial = skipped or any(r.get("note") for r in runs)
    return {"status": "partial" if partial else "ok", "model": model_kwargs, "batch": plan.train_batch,
            "runs": runs, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------
# the report


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
        result = {"status": "error", "error": _error_text(e), "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.monotonic() - start
    result["budget_s"] = budget
    return result


def failures(report: dict) -> list[str]:
    """What makes the run fail: a section error, a failed check, a non-finite training loss."""
    out = []
    for name, section in report["sections"].items():
        if section["status"] == "error":
            out.append(f"{name}: {section['error']}")
    for case in report["sections"].get("correctness", {}).get("cases", []):
        if not case["passed"]:
            out.append(f"correctness {_case_label(case)}: {'; '.join(case['failures'])}")
    for run in report["sections"].get("training", {}).get("runs", []):
        if "error" in run:
            out.append(f"training {run['run']}: {run['error']}")
        for model, m in run.get("models", {}).items():
            if m["nonfinite_losses"]:
                out.append(f"training {run['run']} {model}: {m['nonfinite_losses']} non-finite losses")
    return out


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(heading: str, text: str, columns: list[str]) -> list[str]:
    """A report section's heading, its paragraph and the head of its table."""
    return ["", heading, "", text, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(report: dict) -> str:
    """gpu_report.md: the report's tables."""
    s = report["sections"]
    lines = [f"# GPU suite: `{report['command']}`", "",
             f"{report['device']}, torch {report['torch']}, triton {report['triton']}, {report['started']}; "
             f"{report['seconds']:.0f} s of a {report['time_limit_s']:.0f} s limit. "
             f"Failures: {len(report['failures'])}.", ""]
    lines += [f"- {f}" for f in report["failures"][:50]]
    lines += ["", "| section | status | seconds | budget s | skipped |", "|---|---|---|---|---|"]
    for name, sec in s.items():
        lines.append(f"| {name} | {sec['status']} | {_f(sec.get('seconds'), 0)} | {_f(sec.get('budget_s'), 0)} | "
                     f"{len(sec.get('skipped', []))} |")
    for name, sec in s.items():
        if sec["status"] == "error":
            lines += ["", f"## {name}: error", "", "```", sec["traceback"], "```"]
    if "buckets" in s.get("tune", {}):
        lines += _table("## Block sizes (tune)", f"Written to `{s['tune']['tuned_file']}`: "
                        f"{s['tune']['configs_written']} configs. Time per call of the best and the slowest config "
                        "(forward alone; dK/dV and dQ: forward+backward).",
                        ["kind", "dtype", "BLOCK_D", "shape", "kernel", "best (M, N, warps, stages)", "best ms",
                         "slowest ms", "failed"])
        for b in s["tune"]["buckets"]:
            for name in KERNEL_NAMES:
                cands = b["candidates"][name]
                ok = [c["s"] for c in cands if "error" not in c and c["s"] is not None]
                c = b["best"][name]
                best = f"{c['BLOCK_M']}, {c['BLOCK_N']}, {c['num_warps']}, {c['num_stages']}"
                lines.append(f"| {b['kind']} | {b['dtype']} | {b['block_d']} | {tuple(b['shape'])} | {name} | {best} | "
                             f"{_f(min(ok) * 1e3 if ok else None, 3)} | {_f(max(ok) * 1e3 if ok else None, 3)} | "
                             f"{len(cands) - len(ok)} |")
    if "cases" in s.get("correctness", {}):
        c = s["correctness"]
        lines += _table("## Triton kernels against the float64 reference (correctness)",
                        f"{c['passed']} passed, {c['failed']} failed, {len(c['skipped'])} skipped. Max error / bound "
                        f"(bound: {c['tolerances']} × max(max |reference|, {c['error_floor']})).",
                        ["kind", "dtype", "N", "M", "D", "mask", "out", "dq", "dk", "dv", "dsink", "passed"])
        for case in c["cases"]:
            ratios = [_f(e["max_error"] / e["bound"], 3) if (e := case["errors"].get(n)) else "–"
                      for n in ("out", "dq", "dk", "dv", "dsink")]
            mask = str(case["mask"]) + (" +sink" if case["sink"] else "")
            verdict = "yes" if case["passed"] else "NO: " + "; ".join(case["failures"])
            lines.append(f"| {case['kind']} | {case['dtype']} | {case['N']} | {case['M']} | {case['D']} | {mask} | "
                         + " | ".join(ratios) + f" | {verdict} |")
    if "shapes" in s.get("attention", {}):
        a = s["attention"]
        lines += _table(f"## Attention forward+backward, {a['dtype']} (attention)",
                        f"FLOPs: {a['flops']}. SDPA backends: {a['sdpa_backends']}. Ratios to the first SDPA row "
                        "(throughput: higher is better; memory: lower is better).",
                        ["shape (B, H, N, D)", "impl", "ms", "TFLOP/s", "× flash", "peak MiB", "× flash"])
        for shape in a["shapes"]:
            for r in shape["rows"]:
                if "unavailable" in r:
                    lines.append(f"| {shape['label']} {tuple(shape['shape'])} | {r['impl']} | unavailable: "
                                 f"{r['unavailable'][:120]} | | | | |")
                    continue
                lines.append(f"| {shape['label']} {tuple(shape['shape'])} | {r['impl']} | {_f(r['ms'], 3)} | "
                             f"{_f(r['tflops'], 1)} | {_f(r.get('throughput_x_flash'))} | {_f(r['peak_mib'], 1)} | "
                             f"{_f(r.get('peak_x_flash'))} |")
    if "runs" in s.get("training", {}):
        t = s["training"]
        lines += _table("## Training U-ViC against U-ViT (training)", f"Model {t['model']}, batch {t['batch']}.",
                        ["run", "model", "steps", "non-finite losses", "images/s", "U-ViC / U-ViT", "first-round s",
                         "loss: first 10 → last 10"])
        for run in t["runs"]:
            if "error" in run:
                lines.append(f"| {run['run']} | error: {run['error'][:200]} | | | | | | |")
                continue
            for name, m in run["models"].items():
                lines.append(f"| {run['run']} | {name} | {m['steps']} | {m['nonfinite_losses']} | "
                             f"{_f(m['images_per_s'], 1)} | {_f(run['ratio_uvic_over_uvit'], 3)} | "
                             f"{_f(m['first_round_s'], 1)} | {_f(m['first_losses_mean'], 4)} → "
                             f"{_f(m['last_losses_mean'], 4)} |")
            if run["note"]:
                lines.append(f"| {run['run']} | {run['note']} | | | | | | |")
    skipped = [(name, x) for name, sec in s.items() for x in sec.get("skipped", [])]
    if skipped:
        lines += ["", "## Skipped for time", ""] + [f"- {name}: {x}" for name, x in skipped]
    return "\n".join(lines) + "\n"


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
    tuned_file = args.tuned_file or (args.out / "tuned_blocks.json" if args.dry_run else _triton().TUNED_BLOCKS_FILE)
    clock = Clock(plan.time_limit_s)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"suite": "bench/gpu.py", "command": " ".join(["python bench/gpu.py", *sys.argv[1:]]),
              "dry_run": args.dry_run, **device_info(plan.device), "torch": torch.__version__,
              "triton": triton.__version__, "jobs": plan.jobs, "time_limit_s": plan.time_limit_s,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sections": {}}
    tc = _triton()
    workers = Workers(plan.jobs if {"tune", "correctness"} & set(sections) else 0)
    try:
        report["sections"]["tune"] = run_section(
            "tune", lambda d: tune_section(plan, workers, d, tuned_file), clock, plan, sections)
        tuned = tc.read_tuned_blocks(tuned_file)  # ({}, None) without a file: every kernel autotunes
        tc.use_tuned_blocks(*tuned)  # what every later section launches
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
