"""Cog attention on the CPU, blocked so that memory stays O(N·D) per head.

The scores are computed one block of (heads × query rows × all keys) at a time, a few MiB each, so a
block stays in cache and no N×M tensor outlives it. Forward keeps only q, k, v and the output;
backward recomputes each block's weights (flash-attention style, with ATen's fused row softmax in
place of a stored log-sum-exp):

    p = softmax(|s|),  w = sign(s)·p,  dV += wᵀ dO,  dS = p∘(dO vᵀ) − w∘rowsum(dO∘O),
    dQ = dS k · scale,  dK += dSᵀ q · scale.

Every step is one ATen call on a whole block, so the matmuls run at MKL speed and the Python overhead
is a few hundred calls per pass. Scores and softmax are always float32 (float64 for float64 inputs).
For bfloat16 inputs the matmuls whose results meet in the cancellation dS = p∘(dO vᵀ) − w∘Δ stay
float32 (scores, O = w v from which Δ = rowsum(dO∘O) comes, and dO vᵀ), as in the reference; the
three gradient matmuls (wᵀ dO, dS k, dSᵀ q) run in bfloat16, about 2.5× faster on AVX-512 CPUs.
float16 inputs are computed in float32 because CPUs have no fast float16 matmul.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

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


# Integer views and sign-bit masks for copying the sign of s onto p with two vectorised bitwise passes,
# half the time of torch.copysign, which ATen runs unvectorised.
_SIGN_BIT = {torch.float32: (torch.int32, -(2**31)), torch.float64: (torch.int64, -(2**63))}


def _weights(q: Tensor, k_t: Tensor, drop: Tensor | None, s: Tensor, mag: Tensor, p: Tensor) -> Tensor:
    """Fill p = softmax(|s|) and s := w = sign(s)·p for s = q k_t (k_t = kᵀ), masked after the absolute value.

    s, mag and p are scratch buffers of the block's shape. ATen's softmax is one fused, vectorised
    pass per row; rows with no kept key, which it turns into NaN, are set to zero.
    """
    torch.bmm(q, k_t, out=s)
    torch.abs(s, out=mag)
    if drop is not None:
        mag.masked_fill_(drop, float("-inf"))
    torch.ops.aten._softmax.out(mag, -1, False, out=p)
    if drop is not None:
        empty = drop.all(dim=-1, keepdim=True)
        if empty.any():
            p.masked_fill_(empty, 0.0)
    bits, sign = _SIGN_BIT[s.dtype]
    s.view(bits).bitwise_and_(sign).bitwise_or_(p.view(bits))  # p >= 0: w = p with the sign bit of s
    return s


def _bmm_into(dst: Tensor, a: Tensor, b: Tensor, add: bool = False) -> None:
    """dst = a @ b, or dst += a @ b, in place; dst may be of a wider dtype than a and b."""
    if a.dtype != dst.dtype:
        prod = torch.bmm(a, b)
        dst.add_(prod) if add else dst.copy_(prod)
    elif add:
        dst.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=dst)


class CogAttentionCPU(torch.autograd.Function):
    """Blocked Cog attention: only q, k, v and the output are saved; backward recomputes the weights."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
        B, H, N, D = q.shape
        M = k.shape[2]
        mm, acc = _dtypes(q.dtype)
        qs = (q.to(acc) * scale).reshape(B * H, N, D)
        kk = k.to(acc).reshape(B * H, M, D)
        vv = v.to(mm).reshape(B * H, M, D)
        out = torch.empty(B * H, N, D, dtype=acc)
        masks = _MaskBlocks(attn_mask, B, H, N, M)
        scratch = _Scratch(3, B * H, N, M, acc)
        k_t, v_acc = kk.transpose(1, 2), vv.to(acc)
        for hs, rs in _blocks(B * H, N, M):
            w = _weights(qs[hs, rs], k_t[hs], masks(hs, rs), *scratch.views(hs, rs, M))
            torch.bmm(w, v_acc[hs], out=out[hs, rs])
        ctx.save_for_backward(qs, kk, vv, out, attn_mask)
        ctx.scale = scale
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.view(B, H, N, D).to(v.dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out: Tensor):
        qs, kk, vv, out, attn_mask = ctx.saved_tensors
        B, H, N, D = grad_out.shape
        M = kk.shape[1]
        mm, acc = vv.dtype, out.dtype
        do = grad_out.to(acc).reshape(B * H, N, D)
        delta = (do * out).sum(dim=-1, keepdim=True)
        do_mm = do.to(mm)
        dq = torch.empty(B * H, N, D, dtype=acc)
        dk = torch.empty(B * H, M, D, dtype=acc)
        dv = torch.empty(B * H, M, D, dtype=acc)
        masks = _MaskBlocks(attn_mask, B, H, N, M)
        scratch = _Scratch(4, B * H, N, M, acc)
        # Operands converted and transposed once, not per block (O(N·D) each).
        k_t, v_t = kk.transpose(1, 2), vv.to(acc).transpose(1, 2)
        q_mm, k_mm = qs.to(mm), kk.to(mm)
        for hs, rs in _blocks(B * H, N, M):
            s, mag, p, ds = scratch.views(hs, rs, M)
            w = _weights(qs[hs, rs], k_t[hs], masks(hs, rs), s, mag, p)
            first = rs.start == 0  # dK and dV start at the first query block and sum over the rest
            _bmm_into(dv[hs], w.to(mm).transpose(1, 2), do_mm[hs, rs], add=not first)
            torch.bmm(do[hs, rs], v_t[hs], out=ds)
            ds = ds.mul_(p).addcmul_(w, delta[hs, rs], value=-1.0).to(mm)
            _bmm_into(dq[hs, rs], ds, k_mm[hs])
            _bmm_into(dk[hs], ds.transpose(1, 2), q_mm[hs, rs], add=not first)
        # qs already carries the scale, so dK needs no further factor; dQ does.
        dq.mul_(ctx.scale)
        dtq, dtk, dtv = ctx.dtypes
        shape_k = (B, H, M, D)
        return dq.view(B, H, N, D).to(dtq), dk.view(shape_k).to(dtk), dv.view(shape_k).to(dtv), None, None


def cog_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Cog attention on CPU tensors with O(N·D) memory per head; see `uvit_cog.cog_attention`."""
    if q.device.type != "cpu":
        raise ValueError(f"cog_attention_cpu needs CPU tensors, got {q.device}; use impl='triton' on CUDA")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return CogAttentionCPU.apply(q, k, v, attn_mask, scale)
