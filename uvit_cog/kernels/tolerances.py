"""How close the fused kernels must come to the reference: one definition for tests/test_kernels.py and bench/gpu.py.

An error is the largest absolute difference to the reference, measured against the largest reference value, or
against ERROR_FLOOR where that is smaller (a tensor near zero would otherwise turn rounding into a large relative
error). float32 inputs run full-precision dots (tf32 would miss 1e-4); fp16 and bf16 inputs round q, k, v, the
weights and dS to 11 and 8 significant bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
ERROR_FLOOR = 1e-2


def kernel_error(
    got: Tensor, want: Tensor, dtype: torch.dtype, floor: float = ERROR_FLOOR
) -> tuple[float, float] | None:
    """(max |got − want|, the bound it must stay under) for a kernel's result on inputs of `dtype`; None where
    `got` has a non-finite value (a failure whatever the bound)."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return None
    return (got - want).abs().max().item(), TOLERANCES[dtype] * max(want.abs().max().item(), floor)
