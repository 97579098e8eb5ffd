"""Attention on the CPU, blocked so that memory stays O(N·D) per head, for every row map in `KINDS`.

The scores are computed one block of (heads × query rows × all keys) at a time, a few MiB each, so a
block stays in cache and no N×M tensor outlives it. Forward keeps only q, k, v and the output;
backward recomputes each block's weights (flash-attention style, with ATen's fused row passes in
place of a stored log-sum-exp). The blocking, the masks, the dtypes and the seven matmuls are shared;
the kind only switches the elementwise row map (forward) and its score gradient (backward), one pair
of functions per kind in `_ROW_MAPS`. With dP = dO vᵀ and Δ = rowsum(dO∘O) = Σ_j w_j dP_j:

    cog       p = softmax(|s|), w = sign(s)·p          dS = p∘dP − w∘Δ
    softmax   w = softmax(s)                           dS = w∘(dP − Δ)
    softmax1  w = eˢ/(e^c + Σeˢ)                       dS = w∘(dP − Δ),  dc = −Σ_rows (e^c/Z)·Δ
    sigmoid   w = σ(s + b)                             dS = w∘(1 − w)∘dP  (no normaliser, no Δ)
    softpick  u = eˢ − 1, Z = Σ|u| + ε, w = ReLU(u)/Z  dS = (eˢ/Z)∘([u > 0]∘dP − sign(u)∘Δ)

(softpick: ∂w_i/∂s_j = δ_ij [u_i > 0] e^{s_i}/Z − w_i sign(u_j) e^{s_j}/Z, summed against dP_i; sign(u) =
sign(s); computed max-shifted, e^{s−m}/Z' with Z' = Σ|e^{s−m} − e^{−m}| + ε e^{−m}, m = max(0, max s).)
Then for every kind: dV += wᵀ dO, dQ = dS k · scale, dK += dSᵀ q · scale.

Every step is one ATen call on a whole block, so the matmuls run at MKL speed and the Python overhead
is a few hundred calls per pass. Scores and row maps are always float32 (float64 for float64 inputs).
For bfloat16 inputs the matmuls whose results meet in the cancellation dS = p∘dP − w∘Δ stay
float32 (scores, O = w v from which Δ = rowsum(dO∘O) comes, and dP), as in the reference; the
three gradient matmuls (wᵀ dO, dS k, dSᵀ q) run in bfloat16, about 2.5× faster on AVX-512 CPUs.
float16 inputs are computed in float32 because CPUs have no fast float16 matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import row_map_arguments

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

# A row map turns the scores s of one block (overwritten) into the weights w, using the scratch buffers
# `bufs` and the kind's parameters; it returns (w, aux), aux being what its gradient needs besides w.
# A gradient map turns dP into dS in place, and may overwrite w and aux (dV has been accumulated).
# Rows with no kept key must give w = 0.
RowMap = Callable[[Tensor, "Tensor | None", list, dict], tuple]


def _zero_empty_rows(w: Tensor, drop: Tensor | None) -> None:
    """Rows with no kept key, which ATen's softmax turns into NaN, set to zero."""
    if drop is not None:
        empty = drop.all(dim=-1, keepdim=True)
        if empty.any():
            w.masked_fill_(empty, 0.0)


def _cog(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, Tensor]:
    """p = softmax(|s|) into bufs[1] and s := w = sign(s)·p, masked after the absolute value.

    ATen's softmax is one fused, vectorised pass per row.
    """
    mag, p = bufs[0], bufs[1]
    torch.abs(s, out=mag)
    if drop is not None:
        mag.masked_fill_(drop, float("-inf"))
    torch.ops.aten._softmax.out(mag, -1, False, out=p)
    _zero_empty_rows(p, drop)
    bits, sign = _SIGN_BIT[s.dtype]
    s.view(bits).bitwise_and_(sign).bitwise_or_(p.view(bits))  # p >= 0: w = p with the sign bit of s
    return s, p


def _cog_grad(dp: Tensor, w: Tensor, aux: Tensor, delta: Tensor) -> Tensor:
    return dp.mul_(aux).addcmul_(w, delta, value=-1.0)


def _softmax(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, None]:
    if drop is not None:
        s.masked_fill_(drop, float("-inf"))
    w = torch.ops.aten._softmax.out(s, -1, False, out=bufs[0])
    _zero_empty_rows(w, drop)
    return w, None


def _softmax_grad(dp: Tensor, w: Tensor, aux: None, delta: Tensor) -> Tensor:
    return dp.sub_(delta).mul_(w)


def _softmax1(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, Tensor]:
    """w = p·r with p = softmax(s) (ATen's fused pass) and r = Σeˢ/(e^c + Σeˢ) = 1/(1 + e^{c−m}·p_max).

    Σe^{s−m} = 1/p_max with m the row max, so r needs two cheap passes (the maxima of s and p);
    aux = the sink's weight 1 − r per row. A row with no kept key has p = 0 and gives w = 0.
    """
    if drop is not None:
        s.masked_fill_(drop, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.ops.aten._softmax.out(s, -1, False, out=bufs[0])
    _zero_empty_rows(p, drop)
    m = torch.where(torch.isfinite(m), m, 0.0)
    r = torch.exp(params["sink"] - m).mul_(p.amax(dim=-1, keepdim=True)).add_(1.0).reciprocal_()
    return p.mul_(r), r.neg_().add_(1.0)


def _sigmoid(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, None]:
    w = s.add_(params["bias"]).sigmoid_()
    if drop is not None:
        w.masked_fill_(drop, 0.0)
    return w, None


def _sigmoid_grad(dp: Tensor, w: Tensor, aux: None, delta: Tensor) -> Tensor:
    return torch.ops.aten.sigmoid_backward.grad_input(dp, w, grad_input=dp)  # dP∘w∘(1 − w), one fused pass


def _softpick(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, tuple]:
    """w = ReLU(u)/Z with u = p − e^{−m}·p_max, p = softmax(s), m = max s, Z = Σ|u| + ε e^{−m} p_max.

    eˢ − 1 = e^m (Σe^{s−m}) u and Σe^{s−m} = 1/p_max, so this is softpick's ratio exactly, from ATen's fused
    softmax. A row with m <= 0 has eˢ − 1 <= 0 everywhere, so w = 0: there e^{−m} is replaced by 1 (u <= 0
    all the same, and no overflow). aux = (p, u, Z) for the gradient, in which p/Z = eˢ/(Σ|eˢ − 1| + ε).
    """
    if drop is not None:
        s.masked_fill_(drop, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min_(0.0)  # -inf (no kept key) becomes 0
    p = torch.ops.aten._softmax.out(s, -1, False, out=bufs[0])
    _zero_empty_rows(p, drop)
    floor = m.neg_().exp_().mul_(p.amax(dim=-1, keepdim=True))  # e^{−m}·p_max
    u = torch.sub(p, floor, out=s)
    if drop is not None:
        u.masked_fill_(drop, 0.0)
    w = torch.clamp_min(u, 0.0, out=bufs[1])
    # Σ|u| = 2·Σ ReLU(u) − Σu: two reductions instead of writing |u| (both terms are at most Σ|u|: no cancellation)
    z = w.sum(dim=-1, keepdim=True).mul_(2.0).sub_(u.sum(dim=-1, keepdim=True)).add_(floor, alpha=params["eps"])
    z.clamp_min_(torch.finfo(z.dtype).tiny)  # a row with no kept key: 0 / tiny = 0
    return w.div_(z), (p, u, z)


def _softpick_grad(dp: Tensor, w: Tensor, aux: tuple, delta: Tensor) -> Tensor:
    """dS = (p/Z)∘([u > 0]∘dP − sign(u)∘Δ), in place in dP, w and u (masked keys have p = 0)."""
    g, u, z = aux
    sign = torch.sign(u, out=w)
    return dp.mul_(u.gt_(0.0)).addcmul_(sign, delta, value=-1.0).mul_(g).div_(z)


# kind -> (row map, gradient map, scratch buffers the row map needs besides s)
_ROW_MAPS: dict[str, tuple[RowMap, Callable[..., Tensor], int]] = {
    "cog": (_cog, _cog_grad, 2),
    "softmax": (_softmax, _softmax_grad, 1),
    "softmax1": (_softmax1, _softmax_grad, 1),
    "sigmoid": (_sigmoid, _sigmoid_grad, 0),
    "softpick": (_softpick, _softpick_grad, 2),
}
KINDS = tuple(_ROW_MAPS)


class _Params:
    """A kind's parameters per block: floats as they are, the (H,) sink as the block's (heads, 1, 1) slice."""

    def __init__(self, bias: float, eps: float, sink: Tensor, h: int) -> None:
        self.values = {"bias": bias, "eps": eps}
        self.sink, self.h = sink, h

    def __call__(self, heads: slice) -> dict:
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
    """Blocked attention of one kind: only q, k, v and the output are saved; backward recomputes the weights."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, kind: str,
                bias: float, eps: float, sink: Tensor) -> Tensor:
        B, H, N, D = q.shape
        M = k.shape[2]
        mm, acc = _dtypes(q.dtype)
        row_map, _, extra = _ROW_MAPS[kind]
        qs = (q.to(acc) * scale).reshape(B * H, N, D)
        kk = k.to(acc).reshape(B * H, M, D)
        vv = v.to(mm).reshape(B * H, M, D)
        out = torch.empty(B * H, N, D, dtype=acc)
        masks = _MaskBlocks(attn_mask, B, H, N, M)
        params = _Params(bias, eps, sink.detach().to(acc), H)
        scratch = _Scratch(1 + extra, B * H, N, M, acc)
        k_t, v_acc = kk.transpose(1, 2), vv.to(acc)
        for hs, rs in _blocks(B * H, N, M):
            s, *bufs = scratch.views(hs, rs, M)
            torch.bmm(qs[hs, rs], k_t[hs], out=s)
            w, _ = row_map(s, masks(hs, rs), bufs, params(hs) if kind == "softmax1" else params.values)
            torch.bmm(w, v_acc[hs], out=out[hs, rs])
        ctx.save_for_backward(qs, kk, vv, out, attn_mask, sink)
        ctx.scale, ctx.kind, ctx.params = scale, kind, params
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.view(B, H, N, D).to(v.dtype)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out: Tensor):
        qs, kk, vv, out, attn_mask, sink = ctx.saved_tensors
        B, H, N, D = grad_out.shape
        M = kk.shape[1]
        mm, acc = vv.dtype, out.dtype
        kind, params = ctx.kind, ctx.params
        row_map, grad_map, extra = _ROW_MAPS[kind]
        do = grad_out.to(acc).reshape(B * H, N, D)
        delta = (do * out).sum(dim=-1, keepdim=True)
        do_mm = do.to(mm)
        dq = torch.empty(B * H, N, D, dtype=acc)
        dk = torch.empty(B * H, M, D, dtype=acc)
        dv = torch.empty(B * H, M, D, dtype=acc)
        dsink = torch.zeros(B * H, dtype=acc) if ctx.needs_input_grad[8] else None
        masks = _MaskBlocks(attn_mask, B, H, N, M)
        scratch = _Scratch(2 + extra, B * H, N, M, acc)
        # Operands converted and transposed once, not per block (O(N·D) each).
        k_t, v_t = kk.transpose(1, 2), vv.to(acc).transpose(1, 2)
        q_mm, k_mm = qs.to(mm), kk.to(mm)
        for hs, rs in _blocks(B * H, N, M):
            s, ds, *bufs = scratch.views(hs, rs, M)
            torch.bmm(qs[hs, rs], k_t[hs], out=s)
            w, aux = row_map(s, masks(hs, rs), bufs, params(hs) if kind == "softmax1" else params.values)
            first = rs.start == 0  # dK and dV start at the first query block and sum over the rest
            _bmm_into(dv[hs], w.to(mm).transpose(1, 2), do_mm[hs, rs], add=not first)
            torch.bmm(do[hs, rs], v_t[hs], out=ds)
            ds = grad_map(ds, w, aux, delta[hs, rs]).to(mm)
            _bmm_into(dq[hs, rs], ds, k_mm[hs])
            _bmm_into(dk[hs], ds.transpose(1, 2), q_mm[hs, rs], add=not first)
            if dsink is not None:  # softmax1: aux is the sink's weight per row; dc = −Σ_rows w_sink·Δ
                dsink[hs] -= (aux * delta[hs, rs]).sum(dim=(1, 2))
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
    kind: str = "cog",
    bias: float | None = None,
    eps: float = 1e-6,
    sink: float | Tensor = 0.0,
) -> Tensor:
    """Attention of a kind in `KINDS` on CPU tensors with O(N·D) memory per head; see `uvit_cog.attention`.

    `bias` is sigmoid's b (default −log M), `eps` softpick's ε, `sink` softmax1's logit c (a float or an
    (H,) tensor, differentiable).
    """
    if q.device.type != "cpu":
        raise ValueError(f"attention_cpu needs CPU tensors, got {q.device}; use impl='triton' on CUDA")
    if kind not in _ROW_MAPS:
        raise ValueError(f"attention_cpu: unknown kind {kind!r}; choose one of {KINDS}")
    scale, bias, sink = row_map_arguments(q, k, scale, bias, sink)
    return BlockedAttentionCPU.apply(q, k, v, attn_mask, scale, kind, bias, float(eps), sink)


def cog_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Cog attention on CPU tensors with O(N·D) memory per head; see `uvit_cog.cog_attention`."""
    return attention_cpu(q, k, v, attn_mask, scale, kind="cog")
