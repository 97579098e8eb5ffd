"""Fused kernels for every row map of `uvit_cog.attention`: Triton for CUDA GPUs and a memory-efficient CPU path."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def row_map_arguments(
    q: Tensor, k: Tensor, scale: float | None, bias: float | None, sink: float | Tensor
) -> tuple[float, float, Tensor]:
    """The arguments both kernels take: the score scale (default D^-½), sigmoid's b (default −log M) and
    softmax1's sink logits as an (H,) tensor (a float is repeated per head; a tensor keeps its gradient)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    bias = -math.log(k.shape[2]) if bias is None else float(bias)
    if not isinstance(sink, Tensor):
        sink = torch.full((q.shape[1],), float(sink), device=q.device)
    return scale, bias, sink
