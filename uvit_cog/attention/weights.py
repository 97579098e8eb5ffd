"""The weights of each built-in kind, written plainly: the specification the fused kernels match, what analysis reads.

Each function maps q (B, H, N, D) and k (B, H, M, D) to the (B, H, N, M) weights in float32 (float64 stays):
masked keys (bool `attn_mask`, True = keep) are removed from numerators and normalisers, and a row with no kept
key is all zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SOFTPICK_EPS = 1e-6  # ε of softpick's denominator (the paper's value)


def upcast(t: Tensor) -> Tensor:
    """float32 for half-precision inputs (scores and normalisation never run in fp16/bf16); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def resolve_scale(q: Tensor, scale: float | None) -> float:
    """The score scale: `scale`, or D^-½ for q's head dim D."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def scores(q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    """s = q kᵀ · scale in float32 (or float64)."""
    return torch.matmul(upcast(q), upcast(k).transpose(-2, -1)) * resolve_scale(q, scale)


def _masked(s: Tensor, attn_mask: Tensor | None) -> Tensor:
    return s if attn_mask is None else s.masked_fill(~attn_mask, float("-inf"))


def cog_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The (B, H, N, M) Cog weights `sign(s)·softmax(|s|)` in float32 (or float64), for analysis and reference.

    Max-subtracted and masked after the absolute value; rows with no kept key are all zero.
    """
    s = scores(q, k, scale)
    mag = _masked(s.abs(), attn_mask)
    m = mag.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked row: avoid inf - inf
    e = torch.exp(mag - m)
    a = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    return torch.where(s < 0, -a, a)


def softmax_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The (B, H, N, M) softmax attention weights in float32, for analysis (SDPA never returns them)."""
    return torch.softmax(_masked(scores(q, k, scale), attn_mask), dim=-1).nan_to_num(0.0)


def sigmoid_weights(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None, bias: float | None = None
) -> Tensor:
    """σ(s + b) per score, b = −log M by default (M keys; Ramapuram et al.'s choice); masked keys weigh 0.

    No normalisation: a row's weights sum to anything in (0, M·σ(max s + b)).
    """
    s = scores(q, k, scale)
    w = torch.sigmoid(s + (-math.log(k.shape[-2]) if bias is None else bias))
    return w if attn_mask is None else w.masked_fill(~attn_mask, 0.0)


def softpick_weights(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None, eps: float = SOFTPICK_EPS
) -> Tensor:
    """ReLU(eˢ − 1) / (Σ_kept |eˢ − 1| + ε), computed as ReLU(e^{s−m} − e^{−m}) / (Σ|e^{s−m} − e^{−m}| + ε e^{−m}).

    m = max(0, max_kept s) keeps both exponentials ≤ 1, so |s| up to 1e4 stays finite; the shift is exact.
    Masked keys are in neither numerator nor denominator (not |e^{−∞} − 1| = 1).
    """
    s = _masked(scores(q, k, scale), attn_mask)
    m = s.amax(dim=-1, keepdim=True).clamp_min(0.0)  # -inf (no kept key) becomes 0
    t = torch.exp(s - m) - torch.exp(-m)
    if attn_mask is not None:
        t = t.masked_fill(~attn_mask, 0.0)
    return t.clamp_min(0.0) / (t.abs().sum(dim=-1, keepdim=True) + eps * torch.exp(-m))


def softmax1_weights(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None, sink: float | Tensor = 0.0
) -> Tensor:
    """eˢ / (e^c + Σ_kept eˢ): softmax with one extra key of logit c (0, or an (H,) tensor) and value 0.

    The weights sum to 1 − (the sink's share); a row with no kept key is all zero.
    """
    s = _masked(scores(q, k, scale), attn_mask)
    c = sink if not isinstance(sink, Tensor) else sink.to(s.dtype).view(-1, 1, 1)  # per head, over (B, H, N, M)
    m = torch.maximum(s.amax(dim=-1, keepdim=True), torch.as_tensor(c, dtype=s.dtype))
    e = torch.exp(s - m)
    return e / (e.sum(dim=-1, keepdim=True) + torch.exp(c - m))
