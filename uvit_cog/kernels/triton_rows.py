"""The row maps of the built-in kinds in the Triton kernels (triton_tiling.py): four jit functions each.

Everything is in base 2 (scores s·log2 e, so e^x = 2^{x·log2 e}); m is a query row's running maximum, l its
running normaliser and L = m + log₂ l the statistic that backward recomputes the weights from. Forward, per key
tile (the sums so far rescaled by alpha = 2^{m_old − shift} as the maximum grows; m₀ its start), and at the end:

    cog       p = 2^{|s| − m}, w = sign(s)·p, l += Σp, m₀ = 0                   L = m + log l
    softmax   p = 2^{s − m}, w = p, l += Σp, m₀ = −∞ (shift 0 until a key is kept) L = m + log l
    softmax1  as softmax with m₀ = c (the sink logit); at the end l += 2^{c − m}  L = m + log l
    softpick  u = 2^{s − m} − 2^{−m}, w = ReLU(u), l += Σ|u|, m₀ = 0;
              at the end l += ε·2^{−m}, so l = e^{−m}(Σ|eˢ − 1| + ε)            L = m + log l
    sigmoid   w = σ(s + b): no running max, no normaliser                      (L unused)

and O = Σ w v / l (sigmoid: Σ w v). Backward, per tile, with dP = dO vᵀ and Δ = rowsum(dO∘O) = Σ_j w_j dP_j:

    cog       p = 2^{|s| − L}, w = sign(s)·p                dS = p∘dP − w∘Δ
    softmax   w = 2^{s − L}                                 dS = w∘(dP − Δ)
    softmax1  w = 2^{s − L}                                 dS = w∘(dP − Δ), dc = −Σ_rows 2^{c − L}·Δ
    softpick  g = 2^{s − L} (= eˢ/Z), w = ReLU(g − 2^{−L})  dS = g∘([s > 0]∘dP − sign(s)∘Δ)
    sigmoid   w = σ(s + b)                                  dS = w∘(1 − w)∘dP

(softpick: with u_j = eˢʲ − 1 and Z = Σ|u| + ε, ∂w_i/∂s_j = δ_ij [u_i > 0] eˢⁱ/Z − w_i sign(u_j) eˢʲ/Z;
softmax1: the sink is one more key of logit c and value 0, so its gradient is softmax's, −w_sink·Δ.)
Rows with no kept key give zeros: cog and softmax keep l = 0 and get L = +inf, which makes their weights vanish
in backward; softmax1 and softpick keep the sink or ε alone in l. The public functions here are building blocks
for other row maps (docs/attention.md adds one with them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import TritonRowMap


@triton.jit
def start_zero(c):
    """m₀ = 0: a valid start where every logit is >= 0 (cog's |s|), the maximum is clamped at 0 (softpick), or
    there is no running maximum (a row map without a normaliser)."""
    return 0.0


@triton.jit
def _start_empty(c):
    return float("-inf")


@triton.jit
def _start_sink(c):
    return c


@triton.jit
def kept(x, keep):
    """Logits x at -inf where the key is dropped."""
    return tl.where(keep, x, float("-inf"))


@triton.jit
def unnormalised(w, m):
    """A tile's result for a row map without a normaliser: w, no row sum, the maximum as it was, alpha = 1."""
    return w, tl.zeros(m.shape, tl.float32), m, tl.full(m.shape, 1.0, tl.float32)


@triton.jit
def finish_unnormalised(l, m, c, eps):
    """The end of a row without a normaliser: divide by 1; no statistic for backward."""
    return tl.full(l.shape, 1.0, tl.float32), tl.zeros(l.shape, tl.float32)


@triton.jit
def _running(x, m):
    """The new running maximum of logits x, their 2^{x − m_new} and the rescaling 2^{m − m_new}."""
    m_new = tl.maximum(m, tl.max(x, 1))
    return m_new, tl.exp2(x - m_new[:, None]), tl.exp2(m - m_new)


@triton.jit
def _cog_tile(s, keep, m, bias2):
    m_new, p, alpha = _running(kept(tl.abs(s), keep), m)
    return tl.where(s < 0, -p, p), tl.sum(p, 1), m_new, alpha


@triton.jit
def _softmax_tile(s, keep, m, bias2):
    x = kept(s, keep)
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept key yet: subtract 0, not −inf
    p = tl.exp2(x - shift[:, None])
    return p, tl.sum(p, 1), m_new, tl.exp2(m - shift)


@triton.jit
def _softmax1_tile(s, keep, m, bias2):
    m_new, p, alpha = _running(kept(s, keep), m)  # m starts at the sink logit: never −inf
    return p, tl.sum(p, 1), m_new, alpha


@triton.jit
def _softpick_tile(s, keep, m, bias2):
    m_new, p, alpha = _running(kept(s, keep), m)  # m starts at 0, so 2^{−m} <= 1
    u = tl.where(keep, p - tl.exp2(-m_new)[:, None], 0.0)
    return tl.maximum(u, 0.0), tl.sum(tl.abs(u), 1), m_new, alpha


@triton.jit
def _sigmoid2(s, keep, bias2):
    """σ(s + b) for base-2 scores and bias (σ(z) = 1 / (1 + 2^{−z·log2 e})), 0 where dropped."""
    return tl.where(keep, 1.0 / (1.0 + tl.exp2(-(s + bias2))), 0.0)


@triton.jit
def _sigmoid_tile(s, keep, m, bias2):
    """No normaliser: a plain sum of σ(s + b) v."""
    return unnormalised(_sigmoid2(s, keep, bias2), m)


@triton.jit
def _normalised(l, m):
    """(divisor, L): l, and L = m + log₂ l; a row whose l is 0 (no kept key) divides by 1 and gets L = +inf."""
    kept = l > 0
    l_safe = tl.where(kept, l, 1.0)
    return l_safe, tl.where(kept, m + tl.log2(l_safe), float("inf"))


@triton.jit
def _finish(l, m, c, eps):
    return _normalised(l, m)


@triton.jit
def _softmax1_finish(l, m, c, eps):
    return _normalised(l + tl.exp2(c - m), m)


@triton.jit
def _softpick_finish(l, m, c, eps):
    return _normalised(l + eps * tl.exp2(-m), m)


@triton.jit
def _cog_gradient(s, keep, dp, lse, delta, bias2):
    p = tl.exp2(kept(tl.abs(s), keep) - lse[:, None])
    w = tl.where(s < 0, -p, p)
    return w, p * dp - w * delta[:, None]


@triton.jit
def _softmax_gradient(s, keep, dp, lse, delta, bias2):
    w = tl.exp2(kept(s, keep) - lse[:, None])
    return w, w * (dp - delta[:, None])


@triton.jit
def _softpick_gradient(s, keep, dp, lse, delta, bias2):
    g = tl.exp2(kept(s, keep) - lse[:, None])
    w = tl.maximum(g - tl.exp2(-lse)[:, None], 0.0)
    return w, g * tl.where(s > 0, dp - delta[:, None], tl.where(s < 0, delta[:, None], 0.0))


@triton.jit
def _sigmoid_gradient(s, keep, dp, lse, delta, bias2):
    w = _sigmoid2(s, keep, bias2)
    return w, w * (1.0 - w) * dp


def _softmax1_sink_gradient(c2: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """dc = −Σ 2^{c − L}·Δ over batch and rows: the sink key's weight times −Δ, per head."""
    return -(torch.exp2(c2.view(1, -1, 1) - lse) * delta).sum(dim=(0, 2))


COG = TritonRowMap(start=start_zero, tile=_cog_tile, finish=_finish, gradient=_cog_gradient)
SOFTMAX = TritonRowMap(start=_start_empty, tile=_softmax_tile, finish=_finish, gradient=_softmax_gradient)
SOFTMAX1 = TritonRowMap(start=_start_sink, tile=_softmax1_tile, finish=_softmax1_finish, gradient=_softmax_gradient,
                        sink_gradient=_softmax1_sink_gradient)
SOFTPICK = TritonRowMap(start=start_zero, tile=_softpick_tile, finish=_softpick_finish, gradient=_softpick_gradient)
SIGMOID = TritonRowMap(start=start_zero, tile=_sigmoid_tile, finish=finish_unnormalised, gradient=_sigmoid_gradient)
