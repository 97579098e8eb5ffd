"""The row maps of the built-in kinds in the fused kernels: their CPU halves here, the Triton halves in triton_rows.py.

On the blocked CPU path a row map is a pair: the forward map on one block of scores s (overwritten) and the
score gradient dS from dP = dO vᵀ and Δ = rowsum(dO∘O) = Σ_j w_j dP_j:

    cog       p = softmax(|s|), w = sign(s)·p          dS = p∘dP − w∘Δ
    softmax   w = softmax(s)                           dS = w∘(dP − Δ)
    softmax1  w = eˢ/(e^c + Σeˢ)                       dS = w∘(dP − Δ),  dc = −Σ_rows (e^c/Z)·Δ
    sigmoid   w = σ(s + b)                             dS = w∘(1 − w)∘dP  (no normaliser, no Δ)
    softpick  u = eˢ − 1, Z = Σ|u| + ε, w = ReLU(u)/Z  dS = (eˢ/Z)∘([u > 0]∘dP − sign(u)∘Δ)

(softpick: ∂w_i/∂s_j = δ_ij [u_i > 0] e^{s_i}/Z − w_i sign(u_j) e^{s_j}/Z, summed against dP_i; sign(u) =
sign(s); computed max-shifted, e^{s−m}/Z' with Z' = Σ|e^{s−m} − e^{−m}| + ε e^{−m}, m = max(0, max s).)
Each step is one ATen call on a whole block; ATen's softmax is one fused, vectorised pass per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import CPURowMap, RowMap

_TRITON = "uvit_cog.kernels.triton_rows"

# Integer views and sign-bit masks for copying the sign of s onto p with two vectorised bitwise passes,
# half the time of torch.copysign, which ATen runs unvectorised.
_SIGN_BIT = {torch.float32: (torch.int32, -(2**31)), torch.float64: (torch.int64, -(2**63))}


def _zero_empty_rows(w: Tensor, drop: Tensor | None) -> None:
    """Rows with no kept key, which ATen's softmax turns into NaN, set to zero."""
    if drop is not None:
        empty = drop.all(dim=-1, keepdim=True)
        if empty.any():
            w.masked_fill_(empty, 0.0)


def _mask(s: Tensor, drop: Tensor | None) -> Tensor:
    """s with -inf where dropped, in place."""
    return s if drop is None else s.masked_fill_(drop, float("-inf"))


def _softmax_into(s: Tensor, drop: Tensor | None, out: Tensor) -> Tensor:
    """softmax of masked scores into `out` (ATen's fused pass), rows with no kept key zero."""
    p = torch.ops.aten._softmax.out(s, -1, False, out=out)
    _zero_empty_rows(p, drop)
    return p


def _cog(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, Tensor]:
    """p = softmax(|s|) into bufs[1] and s := w = sign(s)·p, masked after the absolute value."""
    p = _softmax_into(_mask(torch.abs(s, out=bufs[0]), drop), drop, bufs[1])
    bits, sign = _SIGN_BIT[s.dtype]
    s.view(bits).bitwise_and_(sign).bitwise_or_(p.view(bits))  # p >= 0: w = p with the sign bit of s
    return s, p


def _cog_grad(dp: Tensor, w: Tensor, aux: Tensor, delta: Tensor) -> Tensor:
    return dp.mul_(aux).addcmul_(w, delta, value=-1.0)


def _softmax(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, None]:
    return _softmax_into(_mask(s, drop), drop, bufs[0]), None


def _softmax_grad(dp: Tensor, w: Tensor, aux: None, delta: Tensor) -> Tensor:
    return dp.sub_(delta).mul_(w)


def _softmax1(s: Tensor, drop: Tensor | None, bufs: list, params: dict) -> tuple[Tensor, Tensor]:
    """w = p·r with p = softmax(s) (ATen's fused pass) and r = Σeˢ/(e^c + Σeˢ) = 1/(1 + e^{c−m}·p_max).

    Σe^{s−m} = 1/p_max with m the row max, so r needs two cheap passes (the maxima of s and p);
    aux = the sink's weight 1 − r per row. A row with no kept key has p = 0 and gives w = 0.
    """
    m = _mask(s, drop).amax(dim=-1, keepdim=True)
    p = _softmax_into(s, drop, bufs[0])
    m = torch.where(torch.isfinite(m), m, 0.0)
    r = torch.exp(params["sink"] - m).mul_(p.amax(dim=-1, keepdim=True)).add_(1.0).reciprocal_()
    return p.mul_(r), r.neg_().add_(1.0)


def _softmax1_sink_grad(aux: Tensor, delta: Tensor) -> Tensor:
    """dc = −Σ_rows w_sink·Δ per head of the block: the sink is one more key of logit c and value 0."""
    return -(aux * delta).sum(dim=(1, 2))


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
    m = _mask(s, drop).amax(dim=-1, keepdim=True).clamp_min_(0.0)  # -inf (no kept key) becomes 0
    p = _softmax_into(s, drop, bufs[0])
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


COG = RowMap(name="cog", cpu=CPURowMap(forward=_cog, gradient=_cog_grad, buffers=2), triton=f"{_TRITON}:COG")
SOFTMAX = RowMap(name="softmax", cpu=CPURowMap(forward=_softmax, gradient=_softmax_grad, buffers=1),
                 triton=f"{_TRITON}:SOFTMAX")
SOFTMAX1 = RowMap(name="softmax1", triton=f"{_TRITON}:SOFTMAX1", cpu=CPURowMap(
    forward=_softmax1, gradient=_softmax_grad, buffers=1, sink_gradient=_softmax1_sink_grad))
SIGMOID = RowMap(name="sigmoid", cpu=CPURowMap(forward=_sigmoid, gradient=_sigmoid_grad), triton=f"{_TRITON}:SIGMOID")
SOFTPICK = RowMap(name="softpick", cpu=CPURowMap(forward=_softpick, gradient=_softpick_grad, buffers=2),
                  triton=f"{_TRITON}:SOFTPICK")
