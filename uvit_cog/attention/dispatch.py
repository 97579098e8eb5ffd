"""Running a kind: the function each parameter-free kind gets at registration, and the one dispatcher behind them.

A kind's function (`attention_variants[name]`; `cog_attention` is the one of "cog") is `fn(q, k, v,
attn_mask=None, scale=None, dropout_p=0.0, impl=None, **arguments)`. The dispatcher checks the inputs once, fills
in the kind's default arguments and sends the call to the reference (the kind's `weights` times v, differentiated
by autograd), to one of the kind's own implementations, or to the fused kernels of its row map.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.cpu import attention_cpu
from .weights import resolve_scale, upcast

if TYPE_CHECKING:
    from .registry import AttentionKind

AttentionFn = Callable[..., Tensor]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, name: str) -> None:
    """q (B, H, N, D), k and v (B, H, M, D) and a bool mask, or a ValueError naming the function `name`."""
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


def default_impl(kind: AttentionKind, q: Tensor, dropout_p: float) -> str:
    """The implementation when none is asked for: the kind's `default_impl` (softmax: SDPA), else the reference
    for dropout, else the fused kernel of q's device (Triton on CUDA, the blocked CPU path on the CPU), else the
    kind's own implementation (cog: "torch"), else the reference."""
    if kind.default_impl is not None:
        return kind.default_impl
    if dropout_p > 0.0:
        return "reference"
    device = None
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        device = "triton"
    elif q.device.type == "cpu":
        device = "cpu"
    if device in kind.impls:
        return device
    return next(iter(kind.implementations), "reference")


def arguments(kind: AttentionKind, given: Mapping[str, Any], q: Tensor, name: str) -> dict[str, Any]:
    """The kind's keyword arguments: its defaults under those given; unknown names and a misshapen sink refused."""
    unknown = sorted(set(given) - set(kind.arguments))
    if unknown:
        raise ValueError(f"{name}: unknown arguments {unknown}; it takes {sorted(kind.arguments) or 'none'}")
    arguments = {**kind.arguments, **given}
    sink = arguments.get("sink")
    if isinstance(sink, Tensor) and sink.shape != (q.shape[1],):
        raise ValueError(f"{name}: sink must be a float or an (H,) = ({q.shape[1]},) tensor, "
                         f"got shape {tuple(sink.shape)}")
    return arguments


def reference(kind: AttentionKind, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
              scale: float | None, dropout_p: float, arguments: Mapping[str, Any]) -> Tensor:
    """The kind's `weights` times v, with dropout on the weights: the plain O(N·M)-memory specification."""
    w = kind.weights(q, k, attn_mask, scale, **arguments)
    if dropout_p > 0.0:
        w = F.dropout(w, p=dropout_p)
    return torch.matmul(w, upcast(v)).to(v.dtype)


def attend(kind: AttentionKind, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None,
           dropout_p: float, impl: str | None, **given: Any) -> Tensor:
    """Attention of `kind` through `impl` (None: `default_impl`); see `kind_function` for the arguments."""
    name = f"{kind.name}_attention"
    check_qkv(q, k, v, attn_mask, name)
    args = arguments(kind, given, q, name)
    impl = default_impl(kind, q, dropout_p) if impl is None else impl
    if impl not in kind.impls:
        raise ValueError(f"{name}: unknown impl {impl!r}; choose one of {kind.impls}")
    if impl in kind.implementations:
        return kind.implementations[impl](q, k, v, attn_mask, scale, dropout_p, **args)
    if dropout_p > 0.0 and impl != "reference":
        raise ValueError(f"{name}: dropout_p > 0 is only supported by impl='reference', not {impl!r}")
    scale = resolve_scale(q, scale)
    if impl == "reference":
        return reference(kind, q, k, v, attn_mask, scale, dropout_p, args)
    if impl == "cpu":
        return attention_cpu(q, k, v, attn_mask, scale, row_map=kind.row_map, **args)
    # Imported on first use so that `import uvit_cog` works without triton or a GPU.
    from ..kernels.triton_tiling import attention_triton

    return attention_triton(q, k, v, attn_mask, scale, row_map=kind.row_map, **args)


_DOC = """{name} attention `w @ v` with `{formula}`, `s = q kᵀ · scale` ({reference}).

Args:
    q: queries (B, H, N, D); k, v: keys and values (B, H, M, D).
    attn_mask: optional bool mask broadcastable to (B, H, N, M), True = keep (SDPA's convention): a masked key
        leaves the numerator and every normaliser; a row with no kept key returns zeros.
    scale: score scale, default `D ** -0.5`.
    dropout_p: dropout on the weights (training only; the reference path{dropout}).
    impl: one of {impls}; default: {default}.
    **arguments: {arguments}.

Returns:
    (B, H, N, D) output in v's dtype. Scores and normalisers are float32 (float64 stays), so fp16/bf16 inputs and
    |s| up to 1e4 stay finite.

Example:
    >>> q = k = v = torch.randn(2, 8, 65, 64)
    >>> attention_variants[{name!r}](q, k, v).shape
    torch.Size([2, 8, 65, 64])
"""


def kind_function(kind: AttentionKind) -> AttentionFn:
    """The function of a parameter-free kind, made once when it is registered (`AttentionKind.function`)."""

    def fn(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None,
           dropout_p: float = 0.0, impl: str | None = None, **given: Any) -> Tensor:
        return attend(kind, q, k, v, attn_mask, scale, dropout_p, impl, **given)

    fn.__name__ = fn.__qualname__ = f"{kind.name}_attention"
    default = kind.default_impl or "the fused kernel of the device, where the kind has one; else " + (
        next(iter(kind.implementations), "the reference"))
    fn.__doc__ = _DOC.format(
        name=kind.name, formula=kind.formula, reference=kind.reference, impls=kind.impls, default=default,
        dropout=f" and {list(kind.implementations)}" if kind.default_impl else "",
        arguments=", ".join(f"{a} (default {d!r})" for a, d in kind.arguments.items()) or "none")
    return fn
