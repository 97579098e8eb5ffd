"""Attention kinds: the weight functions beside softmax, their dispatch to fused kernels, and the modules U-ViT uses.

Every kind maps the scores `s = q kᵀ · scale` of one query row to weights `w` and returns `w v`:

    softmax    w = softmax(s)                              (SDPA)
    cog        w = sign(s) · softmax(|s|)                  (Lv et al. 2024, arXiv 2411.07176)
    sigmoid    w = σ(s + b),  b = −log M                   (Ramapuram et al. 2024, arXiv 2409.04431)
    softpick   w = ReLU(eˢ − 1) / (Σ|eˢ − 1| + ε)          (Zuhri et al. 2025, arXiv 2504.20966)
    softmax1   w = eˢ / (e^c + Σ eˢ),  c = 0 or learned    ("off-by-one" softmax, a sink; Miller 2023)

and the kinds with parameters wrap one of these: an output gate σ(x W_g) per head or per channel
(Qiu et al. 2025, arXiv 2505.06708) and differential attention (Ye et al. 2024, arXiv 2410.05258).
`ATTENTION_KINDS` is the registry (name → `AttentionKind`, timm-style); `attention_variants` holds the
parameter-free kinds as functions `fn(q, k, v, attn_mask=None, scale=None)`.

Shared rules for every kind: q (B, H, N, D), k and v (B, H, M, D); a bool mask broadcastable to
(B, H, N, M), True = keep, removes a key from the numerator and from every normaliser (for cog after
the absolute value); a row with no kept key gives zeros; scores and normalisers are float32 (float64
stays), so fp16/bf16 inputs and |s| up to 1e4 stay finite; the output has v's dtype.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COG_IMPLS = ("reference", "torch", "cpu", "triton")
KERNEL_KINDS = ("cog", "softmax", "sigmoid", "softpick", "softmax1")  # the row maps the fused kernels know
SOFTPICK_EPS = 1e-6  # ε of softpick's denominator (the paper's value)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, kind: str = "cog") -> None:
    name = f"{kind}_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{name} expects q, k, v of shape (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
            "batch and heads, k and v the key length M, and q and k the head dim D"
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: attn_mask must be a bool tensor (True = keep), got {attn_mask.dtype}. "
            "An additive float mask has no meaning for most kinds: pass `mask > -inf` style booleans instead."
        )


def _upcast(t: Tensor) -> Tensor:
    """float32 for half-precision inputs (scores and normalisation never run in fp16/bf16); float64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def _scores(q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.matmul(_upcast(q), _upcast(k).transpose(-2, -1)) * scale


def _per_head(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A float, or an (H,) tensor shaped (H, 1, 1) to broadcast over (B, H, N, M) scores of `like`'s dtype."""
    return value if not isinstance(value, Tensor) else value.to(like.dtype).view(-1, 1, 1)


# --- weights: the specification of every row map, in float32, for analysis and as the reference ---


def cog_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """The (B, H, N, M) Cog weights `sign(s)·softmax(|s|)` in float32 (or float64), for analysis and reference.

    Max-subtracted and masked after the absolute value; rows with no kept key are all zero.
    """
    s = _scores(q, k, scale)
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
    s = _scores(q, k, scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def sigmoid_weights(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None, bias: float | None = None
) -> Tensor:
    """σ(s + b) per score, b = −log M by default (M keys; Ramapuram et al.'s choice); masked keys weigh 0.

    No normalisation: a row's weights sum to anything in (0, M·σ(max s + b)).
    """
    s = _scores(q, k, scale)
    w = torch.sigmoid(s + (-math.log(k.shape[-2]) if bias is None else bias))
    return w if attn_mask is None else w.masked_fill(~attn_mask, 0.0)


def softpick_weights(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None, eps: float = SOFTPICK_EPS
) -> Tensor:
    """ReLU(eˢ − 1) / (Σ_kept |eˢ − 1| + ε), computed as ReLU(e^{s−m} − e^{−m}) / (Σ|e^{s−m} − e^{−m}| + ε e^{−m}).

    m = max(0, max_kept s) keeps both exponentials ≤ 1, so |s| up to 1e4 stays finite; the shift is exact.
    Masked keys are in neither numerator nor denominator (not |e^{−∞} − 1| = 1).
    """
    s = _scores(q, k, scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
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
    s = _scores(q, k, scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    c = _per_head(sink, s)
    m = torch.maximum(s.amax(dim=-1, keepdim=True), torch.as_tensor(c, dtype=s.dtype))
    e = torch.exp(s - m)
    return e / (e.sum(dim=-1, keepdim=True) + torch.exp(c - m))


WEIGHTS: dict[str, Callable[..., Tensor]] = {
    "softmax": softmax_weights,
    "cog": cog_weights,
    "sigmoid": sigmoid_weights,
    "softpick": softpick_weights,
    "softmax1": softmax1_weights,
}


def reference_attention(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    **params,
) -> Tensor:
    """`weights @ v` for a parameter-free kind (and its parameters: bias, eps, sink), differentiated by autograd.

    The plain O(N·M)-memory specification that the fused paths match.
    """
    w = WEIGHTS[kind](q, k, attn_mask, scale, **params)
    if dropout_p > 0.0:
        w = F.dropout(w, p=dropout_p)
    return torch.matmul(w, _upcast(v)).to(v.dtype)


def cog_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Cog attention written plainly and differentiated by autograd: the specification the fast paths match."""
    return reference_attention("cog", q, k, v, attn_mask, scale, dropout_p)


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


def _attend(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float | None,
    dropout_p: float,
    impl: str | None,
    **params,
) -> Tensor:
    """Dispatch one of sigmoid, softpick, softmax1 (and softmax's kernel impls) to the reference or a fused kernel."""
    _check_qkv(q, k, v, attn_mask, kind)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impls = ("reference", "cpu", "triton")
    if impl is None:
        default = _default_impl(q)
        impl = "reference" if dropout_p > 0.0 or default not in impls else default
    if impl not in impls:
        raise ValueError(f"{kind}_attention: unknown impl {impl!r}; choose one of {impls}")
    if dropout_p > 0.0 and impl != "reference":
        raise ValueError(f"{kind}_attention: dropout_p > 0 is only supported by impl='reference', not {impl!r}")
    if impl == "reference":
        return reference_attention(kind, q, k, v, attn_mask, scale, dropout_p, **params)
    if impl == "cpu":
        from uvit_cog.kernels.cpu import attention_cpu

        return attention_cpu(q, k, v, attn_mask, scale, kind=kind, **params)
    from uvit_cog.kernels.triton_cog import attention_triton

    return attention_triton(q, k, v, attn_mask, scale, kind=kind, **params)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str | None = None,
) -> Tensor:
    """Softmax attention; by default PyTorch's SDPA (impl="sdpa"), or this package's kernels ("cpu", "triton").

    A row with no kept key gives zeros, as SDPA's CPU and flash backends do.
    """
    if impl in (None, "sdpa"):
        _check_qkv(q, k, v, attn_mask, "softmax")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return _attend("softmax", q, k, v, attn_mask, scale, dropout_p, impl)


def sigmoid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    bias: float | None = None,
    dropout_p: float = 0.0,
    impl: str | None = None,
) -> Tensor:
    """Sigmoid attention `σ(s + b) @ v`, b = −log M by default (Ramapuram et al. 2024); masked keys weigh 0."""
    bias = -math.log(k.shape[-2]) if bias is None else float(bias)
    return _attend("sigmoid", q, k, v, attn_mask, scale, dropout_p, impl, bias=bias)


def softpick_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    eps: float = SOFTPICK_EPS,
    dropout_p: float = 0.0,
    impl: str | None = None,
) -> Tensor:
    """Softpick attention `ReLU(eˢ − 1)/(Σ|eˢ − 1| + ε) @ v` (Zuhri et al. 2025), max-shifted so it stays finite."""
    return _attend("softpick", q, k, v, attn_mask, scale, dropout_p, impl, eps=float(eps))


def softmax1_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    sink: float | Tensor = 0.0,
    dropout_p: float = 0.0,
    impl: str | None = None,
) -> Tensor:
    """Softmax with a sink, `eˢ/(e^c + Σeˢ) @ v`: c = `sink`, 0 ("off-by-one") or an (H,) tensor (learnable)."""
    if isinstance(sink, Tensor) and sink.shape != (q.shape[1],):
        raise ValueError(f"softmax1_attention: sink must be a float or an (H,) = ({q.shape[1]},) tensor, "
                         f"got shape {tuple(sink.shape)}")
    return _attend("softmax1", q, k, v, attn_mask, scale, dropout_p, impl, sink=sink)


AttentionFn = Callable[..., Tensor]

# The parameter-free kinds as plain functions fn(q, k, v, attn_mask=None, scale=None) -> Tensor.
attention_variants: dict[str, AttentionFn] = {
    "softmax": softmax_attention,
    "cog": cog_attention,
    "sigmoid": sigmoid_attention,
    "softpick": softpick_attention,
    "softmax1": softmax1_attention,
}


# --- the registry ---


@dataclass(frozen=True)
class AttentionKind:
    """What one attention kind is: its row map, where it comes from, what its weights can do, how it runs.

    `base` names the parameter-free row map (a key of `attention_variants`) that the kind applies;
    the kinds with parameters add an output `gate` ("elementwise" or "headwise"), a learned `sink`
    logit per head (softmax1), or `differential` attention on top of it.
    """

    name: str
    formula: str
    reference: str
    base: str
    negative_weights: bool  # can a weight be < 0
    sparse: bool  # can many weights be exactly or nearly 0 (softpick, sigmoid)
    sink: bool  # do the weights leave mass to a sink (rows sum below 1)
    fused: tuple[str, ...]  # implementations that keep no N×M tensor: "sdpa", "cpu", "triton"
    gate: str | None = None
    learned_sink: bool = False
    differential: bool = False

    @property
    def has_parameters(self) -> bool:
        return self.gate is not None or self.learned_sink or self.differential

    @property
    def function(self) -> AttentionFn:
        """The base row map's attention function (for kinds with parameters, the part without them)."""
        return attention_variants[self.base]

    @property
    def weights(self) -> Callable[..., Tensor]:
        """The base row map's weights function `(q, k, attn_mask, scale) -> (B, H, N, M)` float32."""
        return WEIGHTS[self.base]


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(kind: AttentionKind) -> AttentionKind:
    """Add a kind to `ATTENTION_KINDS` (names are unique; the base must be a parameter-free kind)."""
    if kind.name in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind.name!r} is registered already")
    if kind.base not in attention_variants:
        raise ValueError(f"attention kind {kind.name!r}: base {kind.base!r} is not one of {sorted(attention_variants)}")
    ATTENTION_KINDS[kind.name] = kind
    return kind


def get_attention_kind(name: str) -> AttentionKind:
    """The registered kind `name`, or a ValueError listing the registered names."""
    if name not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention_type {name!r}; choose one of {sorted(ATTENTION_KINDS)}")
    return ATTENTION_KINDS[name]


_KERNELS = ("cpu", "triton")
for _kind in (
    AttentionKind("softmax", "w = softmax(s)", "Vaswani et al. 2017", "softmax", False, False, False,
                  ("sdpa", *_KERNELS)),
    AttentionKind("cog", "w = sign(s)·softmax(|s|)", "Lv et al. 2024, arXiv 2411.07176", "cog", True, False, False,
                  _KERNELS),
    AttentionKind("sigmoid", "w = σ(s − log M)", "Ramapuram et al. 2024, arXiv 2409.04431", "sigmoid", False, True,
                  False, _KERNELS),
    AttentionKind("softpick", "w = ReLU(eˢ − 1) / (Σ|eˢ − 1| + ε)", "Zuhri et al. 2025, arXiv 2504.20966",
                  "softpick", False, True, False, _KERNELS),
    AttentionKind("softmax1", "w = eˢ / (1 + Σeˢ)", "Miller 2023, \"Attention is off by one\"", "softmax1",
                  False, False, True, _KERNELS),
    AttentionKind("softmax1_sink", "w = eˢ / (e^{c_h} + Σeˢ), c_h learned per head", "Miller 2023; Xiao et al. 2023",
                  "softmax1", False, False, True, _KERNELS, learned_sink=True),
    AttentionKind("gated", "out = softmax(s) v ⊙ σ(x W_g), per channel", "Qiu et al. 2025, arXiv 2505.06708",
                  "softmax", False, False, False, ("sdpa", *_KERNELS), gate="elementwise"),
    AttentionKind("gated_headwise", "out = softmax(s) v ⊙ σ(x W_g), one gate per head",
                  "Qiu et al. 2025, arXiv 2505.06708", "softmax", False, False, False, ("sdpa", *_KERNELS),
                  gate="headwise"),
    AttentionKind("cog_gated", "out = sign(s)·softmax(|s|) v ⊙ σ(x W_g), per channel",
                  "Lv et al. 2024 + Qiu et al. 2025", "cog", True, False, False, _KERNELS, gate="elementwise"),
    AttentionKind("sigmoid_gated", "out = σ(s − log M) v ⊙ σ(x W_g), per channel",
                  "Ramapuram et al. 2024 + Qiu et al. 2025", "sigmoid", False, True, False, _KERNELS,
                  gate="elementwise"),
    AttentionKind("diff", "out = RMSNorm((softmax(s₁) − λ softmax(s₂)) v)·(1 − λ_init)",
                  "Ye et al. 2024, arXiv 2410.05258", "softmax", True, False, False, ("sdpa", *_KERNELS),
                  differential=True),
):
    register_attention_kind(_kind)

ATTENTION_TYPES = tuple(ATTENTION_KINDS)  # every name `UViTModel(attention_type=...)` accepts


# --- capture ---


class AttentionCapture:
    """Collects the attention weights of every `Attention` layer of a model during forward passes.

    Use through `capture_attention(model)`. `maps[name]` is a list with one float32 (B, H, N, N)
    tensor per forward pass (for `diff`, (B, H/2, N, N) weights w₁ − λw₂), signed where the kind's
    weights can be negative, on the CPU; `types[name]` is the layer's kind.
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


# --- modules ---


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
        self.kind = get_attention_kind(attention_type)
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention_type = attention_type
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.kind.gate is not None:
            self.gate = nn.Linear(dim, dim if self.kind.gate == "elementwise" else num_heads)
        if self.kind.learned_sink:
            self.sink = nn.Parameter(torch.zeros(num_heads))
        self._capture: tuple[AttentionCapture, str] | None = None

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
            capture.record(name, self.attention_type, self.attention_weights(q, k))
        out = self.attend(q, k, v, self.attn_drop if self.training else 0.0).transpose(1, 2)  # (B, L, heads, d)
        if self.kind.gate is not None:
            out = out * torch.sigmoid(self.gate(x)).view(B, L, out.shape[2], -1)
        return self.proj_drop(self.proj(out.reshape(B, L, C)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attention_type={self.attention_type!r}"


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
