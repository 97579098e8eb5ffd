"""Fused attention kernels that tile any row map: Triton for CUDA GPUs and a blocked, memory-efficient CPU path.

A *row map* turns the scores s = q kᵀ · scale of one query row into the weights w that multiply v. The kernels
own everything else (blocks of queries and keys, masks, dtypes, the matmuls, the running statistics); a row map
brings only its elementwise pieces and their gradient, as a `RowMap`:

- `CPURowMap`: a forward and a gradient function on one block of scores, for the blocked CPU path (`cpu.py`);
- `TritonRowMap`: four `@triton.jit` functions that the Triton kernels (`triton_tiling.py`) call per tile. A
  `RowMap` names it as "module:attribute", imported on first use, so that importing uvit_cog needs no triton.

The built-in row maps are in `row_maps.py` (CPU) and `triton_rows.py` (Triton); an attention kind names its row
map where it is registered (`uvit_cog.attention.kinds`), and the kernels take it from there.

Every row map gets the same three parameters, whichever it uses: `bias`, a float (default −log M, sigmoid's
b), `eps`, a float, and `sink`, one logit per head (an (H,) tensor that receives a gradient). A row map that
reads `sink` gives its gradient (`sink_gradient`).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# (s, drop, bufs, params) -> (w, aux): the scores s of one block (overwritten) into the weights w, using the
# scratch buffers `bufs` and the parameters; aux is what the gradient needs besides w. Rows with no kept key
# (drop: True = masked out) give w = 0.
CPUForward = Callable[[Tensor, "Tensor | None", list[Tensor], dict[str, Any]], tuple[Tensor, Any]]
# (dP, w, aux, Δ) -> dS, in place in dP; may overwrite w and aux (dV is accumulated before it runs).
CPUGradient = Callable[[Tensor, Tensor, Any, Tensor], Tensor]


@dataclass(frozen=True, kw_only=True)
class CPURowMap:
    """A row map on the blocked CPU path: `forward` and `gradient` on one (heads, rows, keys) block.

    `buffers` counts the scratch blocks `forward` needs besides s. `sink_gradient(aux, Δ)` gives the block's
    d sink per head (heads,), for a row map that reads `params["sink"]` (then the block's (heads, 1, 1) slice).
    """

    forward: CPUForward
    gradient: CPUGradient
    buffers: int = 0
    sink_gradient: Callable[[Any, Tensor], Tensor] | None = None


@dataclass(frozen=True, kw_only=True)
class TritonRowMap:
    """A row map in the Triton kernels: four `@triton.jit` functions on base-2 scores (s·log2 e, bias·log2 e,
    sink·log2 e; eps as it is), each compiled into the kernels that call it.

    - `start(c) -> m₀`: the running maximum of a query row before its first key tile (c: the head's sink logit);
    - `tile(s, keep, m, bias) -> (w, row_sum, m_new, alpha)`: one tile's weights relative to the running maximum
      m_new, their contribution to the row's normaliser, and the factor alpha that rescales what the earlier
      tiles added (2^{m − shift}); a kind without a normaliser returns alpha = 1;
    - `finish(l, m, c, eps) -> (norm, L)`: the divisor of the accumulated Σ w v and the float32 row statistic L
      that `gradient` recomputes the weights from;
    - `gradient(s, keep, dp, L, Δ, bias) -> (w, dS)`: one tile's weights and score gradient, dP = dO vᵀ.

    `sink_gradient(c, L, Δ)` (torch, (H,), (B, H, N), (B, H, N)) gives d sink for a row map that reads c.
    """

    start: Any
    tile: Any
    finish: Any
    gradient: Any
    sink_gradient: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


@dataclass(frozen=True, kw_only=True)
class RowMap:
    """One kind's weights inside the fused kernels: its CPU row map and, optionally, its Triton row map.

    `name` names the Triton specialisation and its bucket in the tuning file (`tuned_blocks.json`), so it
    stays the same across releases; `triton` is "module:attribute" of a `TritonRowMap` (None: CPU only).
    """

    name: str
    cpu: CPURowMap
    triton: str | None = None

    def triton_row_map(self) -> TritonRowMap:
        """The Triton row map, imported on first use (after TRITON_INTERPRET is settled)."""
        if self.triton is None:
            raise ValueError(f"row map {self.name!r} has no Triton kernel; use impl='cpu' or 'reference'")
        return _import(self.triton)


@functools.cache
def _import(path: str) -> TritonRowMap:
    module, _, attribute = path.partition(":")
    found = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(found, TritonRowMap):
        raise ValueError(f"{path!r} names no TritonRowMap (write RowMap(triton='package.module:ATTRIBUTE'))")
    return found


def row_map_arguments(
    q: Tensor, k: Tensor, scale: float | None, bias: float | None, sink: float | Tensor
) -> tuple[float, float, Tensor]:
    """The arguments both kernels take: the score scale (default D^-½), `bias` (default −log M) and the sink
    logits as an (H,) tensor (a float is repeated per head; a tensor keeps its gradient)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    bias = -math.log(k.shape[2]) if bias is None else float(bias)
    if not isinstance(sink, Tensor):
        sink = torch.full((q.shape[1],), float(sink), device=q.device)
    return scale, bias, sink
