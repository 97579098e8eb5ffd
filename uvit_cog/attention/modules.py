"""The attention layers of U-ViT: multi-head self-attention of any registered kind, and differential attention."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .registry import get_attention_kind

if TYPE_CHECKING:
    from .capture import AttentionCapture


class Attention(nn.Module):
    """Multi-head self-attention of any registered kind; parameter names follow U-ViT (qkv, proj).

    Kinds with an output gate add `gate` (Linear(dim → dim) per channel, or dim → heads per head,
    applied as σ(x W_g) to each head's output before `proj`, Qiu et al.'s G1 position); `softmax1_sink`
    adds `sink`, one logit per head (initialised to 0, i.e. plain softmax1). `differential` kinds are
    built as `DifferentialAttention` by `make_attention`.
    """

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
        self.kind = get_attention_kind(attention_type)  # the layer's kind; set_attention may switch it
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.kind.gate is not None:
            self.gate = nn.Linear(dim, dim if self.kind.gate == "elementwise" else num_heads)
        if self.kind.learned_sink:
            self.sink = nn.Parameter(torch.zeros(num_heads))
        self._capture: tuple[AttentionCapture, str] | None = None  # set by capture_attention

    def _params(self) -> dict:
        """Keyword arguments of the base function that come from this layer's parameters."""
        return {"sink": self.sink} if self.kind.learned_sink else {}

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The (B, heads, N, N) weights this layer applies, in float32 (what `capture_attention` records)."""
        return self.kind.weights(q, k, None, None, **self._params())

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        """(B, H, N, D) head outputs before the gate."""
        return self.kind.function(q, k, v, dropout_p=dropout_p, **self._params())

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self._capture is not None:
            capture, name = self._capture
            capture.record(name, self.kind.name, self.attention_weights(q, k))
        out = self.attend(q, k, v, self.attn_drop if self.training else 0.0).transpose(1, 2)  # (B, L, heads, d)
        if self.kind.gate is not None:
            out = out * torch.sigmoid(self.gate(x)).view(B, L, out.shape[2], -1)
        return self.proj_drop(self.proj(out.reshape(B, L, C)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_type={self.kind.name!r}"


def diff_lambda_init(layer_index: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·l) for the block at depth l (0-based), as in Ye et al.'s code."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialAttention(Attention):
    """Differential attention (Ye et al. 2024): (A(q₁,k₁) − λ A(q₂,k₂)) v per head, then RMSNorm·(1 − λ_init).

    The layer's `num_heads` sub-heads of size d = dim/num_heads pair up (sub-heads 2i, 2i+1 give q₁, q₂
    and k₁, k₂ of head i) and the value of head i is their 2d channels, as in the official
    `multihead_diffattn.py`: `qkv` and `proj` keep U-ViT's shapes and there are num_heads/2 heads.
    λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init with λ_· ~ N(0, 0.1²) vectors of size d.
    Both maps run through the base kind's fused function, so memory stays linear in N.
    """

    def __init__(self, dim: int, num_heads: int = 8, attention_type: str = "diff", qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, layer_index: int = 0) -> None:
        super().__init__(dim, num_heads, attention_type, qkv_bias, attn_drop, proj_drop)
        if num_heads % 2:
            raise ValueError(f"attention_type {attention_type!r} pairs heads: num_heads must be even, got {num_heads}")
        head_dim = dim // num_heads
        self.lambda_init = diff_lambda_init(layer_index)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(head_dim) * 0.1) for _ in range(4)
        )
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)

    def lam(self) -> Tensor:
        dot = lambda a, b: torch.exp(torch.dot(a.float(), b.float()))  # noqa: E731
        return dot(self.lambda_q1, self.lambda_k1) - dot(self.lambda_q2, self.lambda_k2) + self.lambda_init

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        w = self.kind.weights(q, k)
        return w[:, 0::2] - self.lam() * w[:, 1::2]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        B, H, N, D = v.shape
        v2 = v.transpose(1, 2).reshape(B, N, H // 2, 2 * D).transpose(1, 2)
        fn = self.kind.function
        # q and k of one map keep head dim D: the score scale is D^-0.5 as in the paper's code.
        out = fn(q[:, 0::2], k[:, 0::2], v2, dropout_p=dropout_p)
        out = out - self.lam().to(out.dtype) * fn(q[:, 1::2], k[:, 1::2], v2, dropout_p=dropout_p)
        return self.subln(out) * (1.0 - self.lambda_init)


def make_attention(attention_type: str, dim: int, num_heads: int, qkv_bias: bool = False,
                   layer_index: int = 0) -> Attention:
    """The attention module of kind `attention_type` for block `layer_index` (depth matters for `diff`'s λ_init)."""
    if get_attention_kind(attention_type).differential:
        return DifferentialAttention(dim, num_heads, attention_type, qkv_bias, layer_index=layer_index)
    return Attention(dim, num_heads, attention_type, qkv_bias)
