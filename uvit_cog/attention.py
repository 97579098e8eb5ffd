"""Softmax and Cog attention, and the `Attention` module that U-ViT blocks use.

Cog attention (Lv et al., "More Expressive Attention with Negative Weights", arXiv 2411.07176):

    s = q kᵀ · scale,   w = sign(s) · softmax(|s|),   out = w v

so that a head can copy (w > 0), delete (w < 0) or ignore (w ≈ 0) a token. Masks act on |s| before
the softmax: a masked key is in neither numerator nor denominator, and a row with no kept key gives
zeros. This module holds the maths (`cog_attention_reference`), a lean autograd Function (weights
saved once, flash-attention-style backward), dispatch to the fused kernels, and a capture hook for
analysing attention maps.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_TYPES = ("cog", "softmax")
COG_IMPLS = ("reference", "torch", "cpu", "triton")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"cog_attention expects q, k, v of shape (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"cog_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
            "batch and heads, k and v the key length M, and q and k the head dim D"
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(
            f"cog_attention: attn_mask must be a bool tensor (True = keep), got {attn_mask.dtype}. "
            "An additive float mask has no meaning under |s|: pass `mask > -inf` style booleans instead."
        )


def _upcast(t: Tensor) -> Tensor:
    """float32 for half-precision inputs (scores and normalisation never run in fp16/bf16); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def cog_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The (B, H, N, M) Cog weights `sign(s)·softmax(|s|)` in float32 (or float64), for analysis and reference.

    Max-subtracted and masked after the absolute value; rows with no kept key are all zero.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(_upcast(q), _upcast(k).transpose(-2, -1)) * scale
    mag = s.abs()
    if attn_mask is not None:
        mag = mag.masked_fill(~attn_mask, float("-inf"))
    m = mag.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked row: avoid inf - inf
    e = torch.exp(mag - m)
    a = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    return torch.where(s < 0, -a, a)


def softmax_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The (B, H, N, M) softmax attention weights in float32, for analysis (SDPA never returns them)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(_upcast(q), _upcast(k).transpose(-2, -1)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def cog_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Cog attention written plainly and differentiated by autograd: the specification the fast paths match."""
    w = cog_weights(q, k, attn_mask, scale)
    if dropout_p > 0.0:
        w = F.dropout(w, p=dropout_p)
    return torch.matmul(w, _upcast(v)).to(v.dtype)


class CogAttentionFunction(torch.autograd.Function):
    """Cog attention with one N×M tensor (the weights) kept for backward instead of autograd's five.

    Backward is the flash-attention backward with one change: with a = softmax(|s|) = |w|,
    dS = a∘(dO vᵀ) − w∘rowsum(dO∘O). Saving w is enough because a = |w| and sign(s) only matters
    where a > 0.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
        w = cog_weights(q, k, attn_mask, scale)
        out = torch.matmul(w, _upcast(v))
        ctx.save_for_backward(q, k, v, w, out)
        ctx.scale = scale
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, w, out = ctx.saved_tensors
        do = _upcast(grad_out)
        delta = (do * out).sum(dim=-1, keepdim=True)
        ds = w.abs() * torch.matmul(do, _upcast(v).transpose(-2, -1)) - w * delta
        ds = ds * ctx.scale
        dq = torch.matmul(ds, _upcast(k)).to(q.dtype)
        dk = torch.matmul(ds.transpose(-2, -1), _upcast(q)).to(k.dtype)
        dv = torch.matmul(w.transpose(-2, -1), do).to(v.dtype)
        return dq, dk, dv, None, None


def _default_impl(q: Tensor) -> str:
    """Fused kernels where they exist: Triton on CUDA, the blocked CPU path on the CPU, else "torch"."""
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if q.device.type == "cpu":
        return "cpu"
    return "torch"


def cog_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str | None = None,
) -> Tensor:
    """Cog attention `sign(s)·softmax(|s|) @ v` with `s = q kᵀ · scale`.

    Args:
        q: queries (B, H, N, D); k, v: keys and values (B, H, M, D).
        attn_mask: optional bool mask broadcastable to (B, H, N, M), True = keep (SDPA's convention).
            Applied after the absolute value; a row with no kept key returns zeros.
        scale: score scale, default `D ** -0.5`.
        dropout_p: dropout on the weights (training only; uses the reference path, as U-ViT trains
            without attention dropout).
        impl: force an implementation: "reference" (plain autograd), "torch" (lean autograd
            Function), "cpu" or "triton" (fused kernels). Default: the fastest for the device.

    Returns:
        (B, H, N, D) output in v's dtype. Scores are normalised in float32, so fp16/bf16 inputs stay finite.

    Example:
        >>> q = k = v = torch.randn(2, 8, 65, 64)
        >>> cog_attention(q, k, v).shape
        torch.Size([2, 8, 65, 64])
    """
    _check_qkv(q, k, v, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl is None:
        impl = "reference" if dropout_p > 0.0 else _default_impl(q)
    if impl not in COG_IMPLS:
        raise ValueError(f"cog_attention: unknown impl {impl!r}; choose one of {COG_IMPLS}")
    if dropout_p > 0.0 and impl != "reference":
        raise ValueError(f"cog_attention: dropout_p > 0 is only supported by impl='reference', not {impl!r}")
    if impl == "reference":
        return cog_attention_reference(q, k, v, attn_mask, scale, dropout_p)
    if impl == "torch":
        return CogAttentionFunction.apply(q, k, v, attn_mask, scale)
    # The kernels are imported on first use so that `import uvit_cog` works without triton or a GPU.
    if impl == "cpu":
        from uvit_cog.kernels.cpu import cog_attention_cpu

        return cog_attention_cpu(q, k, v, attn_mask, scale)
    from uvit_cog.kernels.triton_cog import cog_attention_triton

    return cog_attention_triton(q, k, v, attn_mask, scale)


class AttentionCapture:
    """Collects the attention weights of every `Attention` layer of a model during forward passes.

    Use through `capture_attention(model)`. `maps[name]` is a list with one float32 (B, H, N, N)
    tensor per forward pass, signed for Cog layers, on the CPU.
    """

    def __init__(self) -> None:
        self.maps: dict[str, list[Tensor]] = {}
        self.types: dict[str, str] = {}

    def record(self, name: str, attention_type: str, weights: Tensor) -> None:
        self.maps.setdefault(name, []).append(weights.detach().float().cpu())
        self.types[name] = attention_type


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionCapture]:
    """Capture the attention weights of all `Attention` layers in `model` inside the `with` block.

    Layers are keyed by module name (e.g. "in_blocks.0.attn"). Outside the block the layers run
    their normal fused path: capturing costs nothing unless it is switched on.

    Example:
        >>> with capture_attention(model) as cap:
        ...     model(x, t)
        >>> cap.maps["mid_block.attn"][0].shape  # (B, H, N, N)
    """
    capture = AttentionCapture()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    for name, m in layers:
        m._capture = (capture, name)
    try:
        yield capture
    finally:
        for _, m in layers:
            m._capture = None


class Attention(nn.Module):
    """Multi-head self-attention with softmax or Cog weights; parameter names follow U-ViT (qkv, proj)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attention_type: str = "cog",
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {attention_type!r}; choose one of {ATTENTION_TYPES}")
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._capture: tuple[AttentionCapture, str] | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        if self._capture is not None:
            capture, name = self._capture
            weights_fn = cog_weights if self.attention_type == "cog" else softmax_weights
            capture.record(name, self.attention_type, weights_fn(q, k))
        if self.attention_type == "cog":
            x = cog_attention(q, k, v, dropout_p=drop)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        x = x.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_type={self.attention_type!r}"
