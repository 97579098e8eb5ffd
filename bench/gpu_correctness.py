"""bench/gpu.py's correctness section: the Triton kernels of every kind against the float64 reference.

fp32, fp16, bf16; N ∈ {257, 1025, 4097} × D ∈ {64, 72, 128}; a key-padding mask and a per-row mask with a row that
keeps no key, both at M ≠ N; softmax1 with a learned sink. Output and dq, dk, dv (and d sink) within the
tolerances the tests use (`uvit_cog.kernels.tolerances`); a non-finite value is a failure. Run by the worker
processes (nothing is timed), with the kernels launching the tuned configs.
"""

from __future__ import annotations

import torch
from gpu_common import Workers, error_text
from gpu_plan import DTYPES, KINDS, Plan

from uvit_cog import attention_variants
from uvit_cog.attention import reference_attention
from uvit_cog.kernels import triton_tuning
from uvit_cog.kernels.tolerances import ERROR_FLOOR, TOLERANCES, kernel_error

# The tolerances by dtype name, as the report states them.
TOL = {name: TOLERANCES[dtype] for name, dtype in DTYPES.items()}


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
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsink"), got, want, strict=False):
        found = kernel_error(a, b, DTYPES[case["dtype"]])
        if found is None:
            failures.append(f"{name}: non-finite values")
            continue
        errors[name] = {"max_error": found[0], "bound": found[1]}
        if found[0] > found[1]:
            failures.append(f"{name}: max error {found[0]:.3g} > {found[1]:.3g}")
    if case["mask"] == "rows" and not (torch.all(out[0, 0, case["N"] // 2] == 0)
                                       and torch.all(got[1][0, 0, case["N"] // 2] == 0)):
        failures.append("the row that keeps no key is not zero (output or dq)")
    return {**case, "passed": not failures, "errors": errors, "failures": failures}


def _check_task(cases: list[dict], heads: int, device: str, tuned: tuple[dict, tuple | None]) -> list[dict]:
    """Worker: check a group of cases with the kernels launching the tuned configs."""
    triton_tuning.use_tuned_blocks(*tuned)
    results = []
    for case in cases:
        try:
            results.append(check_case(case, heads, device))
        except Exception as e:  # noqa: BLE001 - a case that raises is a failed case
            results.append({**case, "passed": False, "errors": {}, "failures": [error_text(e)]})
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
            "skipped": [case_label(c) for c in skipped], "cases": done}


def case_label(case: dict) -> str:
    sink = " learned sink" if case["sink"] else ""
    return f"{case['kind']} {case['dtype']} N={case['N']} M={case['M']} D={case['D']} mask={case['mask']}{sink}"
