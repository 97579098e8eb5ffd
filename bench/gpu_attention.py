"""bench/gpu.py's attention section: forward+backward speed and memory of every fused kind against SDPA.

Every fused kind (Triton) against SDPA restricted to its flash backend and to its cuDNN backend, bf16, at the
attention shapes of the U-ViT recipes (`gpu_plan.uvit_attention_shapes`: CIFAR-10 S/2, ImageNet-64 M/4,
ImageNet-256 H/2, MS-COCO text-to-image S/2, batch 128, the recipes' per-GPU batch) and at N = 4097: time,
TFLOP/s and peak memory, each as a ratio to flash. FLOPs: 4·B·H·N·M·D forward (two matmuls), 2.5× that backward
(five), so 14·B·H·N·M·D per forward+backward, the count FlashAttention's benchmarks use. Implementations
interleaved in rounds; medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from attention import forward_backward, make_inputs
from gpu_common import error_text, peak_bytes, round_times, sync, triton_fn
from gpu_plan import DTYPES, KINDS, LONG_SHAPE, Plan, uvit_attention_shapes
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

FLOPS_NOTE = "4·B·H·N·M·D forward, 2.5× that backward: 14·B·H·N·M·D per forward+backward"


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
            rows[name]["unavailable"] = error_text(e)
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
