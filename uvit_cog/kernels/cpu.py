"""Attention on the CPU, blocked so that memory stays O(N·D) per head, for any row map (`uvit_cog.kernels.RowMap`).

The scores are computed one block of (heads × query rows × all keys) at a time, a few MiB each, so a
block stays in cache and no N×M tensor outlives it. Forward keeps only q, k, v and the output;
backward recomputes each block's weights (flash-attention style, with ATen's fused row passes in
place of a stored log-sum-exp). The blocking, the masks, the dtypes and the seven matmuls are shared;
the row map only brings the elementwise map of a block's scores (forward) and its score gradient dS
(backward; the built-in ones and their derivations are in row_maps.py). Then for every row map:
dV += wᵀ dO, dQ = dS k · scale, dK += dSᵀ q · scale.

Every step is one ATen call on a whole block, so the matmuls run at MKL speed and the Python overhead
is a few hundred calls per pass. Scores and row maps are always float32 (float64 for float64 inputs).
For bfloat16 inputs the matmuls whose results meet in the cancellation dS = p∘dP − w∘Δ stay
float32 (scores, O = w v from which Δ = rowsum(dO∘O) comes, and dP), as in the reference; the
three gradient matmuls (wᵀ dO, dS k, dSᵀ q) run in bfloat16, about 2.5× faster on AVX-512 CPUs.
float16 inputs are computed in float32 because CPUs have no fast float16 matmul.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from . import RowMap, row_map_arguments

# Score elements per block: 2^18 float32 = 1 MiB, so the four scratch blocks fit in L2/L3 while the
# per-call overhead stays small against the matmul work (2^17 to 2^20 measured, docs/benchmarks.md).
BLOCK_ELEMENTS = 1 << 18


def _block_shape(bh: int, n: int, m: int) -> tuple[int, int]:
    """(heads, query rows) per block: about BLOCK_ELEMENTS scores, whole heads while rows fit.

    The head count is rounded down to a multiple of the thread count: ATen splits a batched matmul
    across threads by batch entry, so 3 heads on 2 threads run a third slower per head than 2 or 4.
    """
    rows = min(n, max(1, BLOCK_ELEMENTS // max(m, 1)))
    heads = min(bh, max(1, BLOCK_ELEMENTS // (rows * max(m, 1))))
    threads = torch.get_num_threads()
    return (heads - heads % threads if heads > threads else heads), rows


def _blocks(bh: int, n: int, m: int) -> Iterator[tuple[slice, slice]]:
    """(head slice, query slice) pairs covering (bh, n), heads outermost."""
    heads, rows = _block_shape(bh, n, m)
    for h0 in range(0, bh, heads):
        for r0 in range(0, n, rows):
            yield slice(h0, min(h0 + heads, bh)), slice(r0, min(r0 + rows, n))


class _Scratch:
    """Score-block buffers allocated once per call: fresh multi-MiB tensors per block cost page faults
    that slow the matmuls writing them by a third."""

    def __init__(self, count: int, bh: int, n: int, m: int, dtype: torch.dtype) -> None:
        heads, rows = _block_shape(bh, n, m)
        self.buffers = [torch.empty(heads * rows * m, dtype=dtype) for _ in range(count)]
        self.cache: dict[tuple[int, int, int], list[Tensor]] = {}  # full blocks and the remainders

    def views(self, hs: slice, rs: slice, m: int) -> list[Tensor]:
        shape = (hs.stop - hs.start, rs.stop - rs.start, m)
        if shape not in self.cache:
            self.cache[shape] = [b[: shape[0] * shape[1] * m].view(shape) for b in self.buffers]
        return self.cache[shape]


def _dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the gradient matmuls, dtype of everything else) for an input dtype."""
    if dtype == torch.float64:
        return torch.float64, torch.float64
    if dtype == torch.bfloat16:
        return torch.bfloat16, torch.float32
    return torch.float32, torch.float32


class _MaskBlocks:
    """Hands out the dropped-key mask (True = masked out) of one block without expanding the full mask."""

    def __init__(self, attn_mask: Tensor | None, b: int, h: int, n: int, m: int) -> None:
        self.drop = None if attn_mask is None else (~attn_mask).expand(b, h, n, m)
        self.h = h

    def __call__(self, heads: slice, rows: slice) -> Tensor | None:
        if self.drop is None:
            return None
        idx = torch.arange(heads.start, heads.stop)
        return self.drop[idx // self.h, idx % self.h, rows]


class _Params:
    """A row map's parameters per block: floats as they are, and for a row map that reads the (H,) sink, the
    block's (heads, 1, 1) slice of it."""

    def __init__(self, bias: float, eps: float, sink: Tensor | None, h: int) -> None:
        self.values = {"bias": bias, "eps": eps}
        self.sink, self.h = sink, h

    def __call__(self, heads: slice) -> dict:
        if self.sink is None:
            return self.values
        idx = torch.arange(heads.start, heads.stop) % self.h
        return {**self.values, "sink": self.sink[idx].view(-1, 1, 1)}


def _bmm_into(dst: Tensor, a: Tensor, b: Tensor, add: bool = False) -> None:
    """dst = a @ b, or dst += a @ b, in place; dst may be of a wider dtype than a and b."""
    if a.dtype != dst.dtype:
        prod = torch.bmm(a, b)
        dst.add_(prod) if add else dst.copy_(prod)
    elif add:
        dst.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=dst)


class BlockedAttentionCPU(torch.autograd.Function):
    """Blocked attention of one row map: only q, k, v and the output are saved; backward recomputes the weights."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, row_map: RowMap,
                bias: float, eps: float, sink: Tensor) -> Tensor:
        B, H, N, D = q.shape
        M = k.shape[2]
        mm, acc = _dtypes(q.dtype)
        rows = row_map.cpu
        qs = (q.to(acc) * scale).reshape(B * H, N, D)
        kk = k.to(acc).reshape(B * H, M, D)
        vv = v.to(mm).reshape(B * H, M, D)
        out = torch.empty(B * H, N, D, dtype=acc)
        masks = _MaskBlocks(attn_mask, B, H, N, M)
        params = _Params(bias, eps, sink.detach().to(acc) if rows.sink_gradient else None, H)
        scratch = _Scratch(1 + rows.buffers, B * H, N, M, acc)
        k_t, v_acc = kk.transpose(1, 2), vv.to(acc)
        for hs, rs in _blocks(B * H, N, M):
            s, *bufs = scratch.views(hs, rs, M)
            torch.bmm(qs[hs, rs], k_t[hs], out=s)
            w, _ = rows.forward(s, masks(hs, rs), bufs, params(hs))
            torch.bmm(w, v_acc[hs], out=out[hs, rs])
        ctx.save_for_backward(qs, kk, vv, out, attn_mask, sink)
        ctx.scale, ctx.rows, ctx.params = scale, rows, params
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.view(B, H, N, D).to(v.dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out: Tensor):
        qs, kk, vv, out, attn_mask, sink = ctx.saved_tensors
        B, H, N, D = grad_out.shape
        M = kk.shape[1]
        mm, acc = vv.dtype, out.dtype
        rows, params = ctx.rows, ctx.params
        do = grad_out.to(acc).reshape(B * H, N, D)
        delta = (do * out).sum(dim=-1, keepdim=True)
        do_mm = do.to(mm)
        dq = torch.empty(B * H, N, D, dtype=acc)
        dk = torch.empty(B * H, M, D, dtype=acc)
        dv = torch.empty(B * H, M, D, dtype=acc)
        dsink = torch.zeros(B * H, dtype=acc) if ctx.needs_input_grad[8] and rows.sink_gradient else None
        masks = _MaskBlocks(attn_mask, B, H, N, M)
        scratch = _Scratch(2 + rows.buffers, B * H, N, M, acc)
        # Operands converted and transposed once, not per block (O(N·D) each).
        k_t, v_t = kk.transpose(1, 2), vv.to(acc).transpose(1, 2)
        q_mm, k_mm = qs.to(mm), kk.to(mm)
        for hs, rs in _blocks(B * H, N, M):
            s, ds, *bufs = scratch.views(hs, rs, M)
            torch.bmm(qs[hs, rs], k_t[hs], out=s)
            w, aux = rows.forward(s, masks(hs, rs), bufs, params(hs))
            first = rs.start == 0  # dK and dV start at the first query block and sum over the rest
            _bmm_into(dv[hs], w.to(mm).transpose(1, 2), do_mm[hs, rs], add=not first)
            torch.bmm(do[hs, rs], v_t[hs], out=ds)
            if dsink is not None:  # before the gradient map, which may overwrite aux
                dsink[hs] += rows.sink_gradient(aux, delta[hs, rs])
            ds = rows.gradient(ds, w, aux, delta[hs, rs]).to(mm)
            _bmm_into(dq[hs, rs], ds, k_mm[hs])
            _bmm_into(dk[hs], ds.transpose(1, 2), q_mm[hs, rs], add=not first)
        # qs already carries the scale, so dK needs no further factor; dQ does.
        dq.mul_(ctx.scale)
        dtq, dtk, dtv = ctx.dtypes
        shape_k = (B, H, M, D)
        dc = None if dsink is None else dsink.view(B, H).sum(0).to(sink.dtype)
        dq, dk, dv = dq.view(B, H, N, D).to(dtq), dk.view(shape_k).to(dtk), dv.view(shape_k).to(dtv)
        return dq, dk, dv, None, None, None, None, None, dc


def attention_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    *,
    row_map: RowMap,
    bias: float | None = None,
    eps: float = 1e-6,
    sink: float | Tensor = 0.0,
) -> Tensor:
    """Attention of `row_map` (e.g. `uvit_cog.kernels.row_maps.COG`, or an attention kind's `row_map`) on CPU
    tensors with O(N·D) memory per head; see `uvit_cog.attention` for the conventions.

    `bias` (default −log M), `eps` and `sink` (a float or an (H,) tensor, differentiable) are the row map's
    parameters (sigmoid's b, softpick's ε, softmax1's logit c).
    """
    if q.device.type != "cpu":
        raise ValueError(f"attention_cpu needs CPU tensors, got {q.device}; use impl='triton' on CUDA")
    scale, bias, sink = row_map_arguments(q, k, scale, bias, sink)
    return BlockedAttentionCPU.apply(q, k, v, attn_mask, scale, row_map, bias, float(eps), sink)
