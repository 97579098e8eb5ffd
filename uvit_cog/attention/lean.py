"""Cog attention's `impl="torch"`: an autograd Function that keeps one N×M tensor for backward, not autograd's five.

The path for devices without a fused kernel (neither CUDA with Triton nor the CPU), and the control that shows the
fused paths' memory savings (tests/test_kernels.py, bench/attention.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weights import cog_weights, resolve_scale, upcast


class CogAttentionFunction(torch.autograd.Function):
    """Cog attention with one N×M tensor (the weights) kept for backward instead of autograd's five.

    Backward is the flash-attention backward with one change: with a = softmax(|s|) = |w|,
    dS = a∘(dO vᵀ) − w∘rowsum(dO∘O). Saving w is enough because a = |w| and sign(s) only matters
    where a > 0.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
        w = cog_weights(q, k, attn_mask, scale)
        out = torch.matmul(w, upcast(v))
        ctx.save_for_backward(q, k, v, w, out)
        ctx.scale = scale
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, w, out = ctx.saved_tensors
        do = upcast(grad_out)
        delta = (do * out).sum(dim=-1, keepdim=True)
        ds = w.abs() * torch.matmul(do, upcast(v).transpose(-2, -1)) - w * delta
        ds = ds * ctx.scale
        dq = torch.matmul(ds, upcast(k)).to(q.dtype)
        dk = torch.matmul(ds.transpose(-2, -1), upcast(q)).to(k.dtype)
        dv = torch.matmul(w.transpose(-2, -1), do).to(v.dtype)
        return dq, dk, dv, None, None


def lean_cog_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None, dropout_p: float
) -> Tensor:
    """`CogAttentionFunction` as an implementation of the registry (`impl="torch"`); it has no dropout."""
    if dropout_p > 0.0:
        raise ValueError("cog_attention: dropout_p > 0 is only supported by impl='reference', not 'torch'")
    return CogAttentionFunction.apply(q, k, v, attn_mask, resolve_scale(q, scale))
