"""Attention kinds: the weight functions beside softmax, their registry, their dispatch to fused kernels, the modules.

Every kind maps the scores `s = q kᵀ · scale` of one query row to weights `w` and returns `w v` (the built-in
kinds and their papers: `kinds.py`, docs/attention.md). `ATTENTION_KINDS` is the registry (name →
`AttentionKind`, timm-style), filled by `register_attention_kind(...)`, one declaration per kind; from it come
`attention_variants` (the parameter-free kinds as functions `fn(q, k, v, attn_mask=None, scale=None)`), the
modules and the fused kernels' row maps.

Shared rules for every kind: q (B, H, N, D), k and v (B, H, M, D); a bool mask broadcastable to
(B, H, N, M), True = keep, removes a key from the numerator and from every normaliser (for cog after
the absolute value); a row with no kept key gives zeros; scores and normalisers are float32 (float64
stays), so fp16/bf16 inputs and |s| up to 1e4 stay finite; the output has v's dtype.

One concept per module, imports pointing down: `weights` (the specification of each row map) → `dispatch`
(running a kind: reference, own implementations, `uvit_cog.kernels`) → `registry` (the declarations; each
parameter-free kind gets its function from `dispatch`) → `kinds` (the built-in declarations) and `modules` (the
layers) → `capture` (recording their weights); `lean` is Cog's autograd Function (`impl="torch"`), `layers` the
block selections ("first_last", ...) that place kinds in a model.
"""

from .capture import AttentionCapture, capture_attention
from .dispatch import default_impl
from .kinds import cog_attention, cog_attention_reference
from .layers import LAYER_SELECTIONS, complement, select_layers
from .lean import CogAttentionFunction
from .modules import Attention, DifferentialAttention, diff_lambda_init, make_attention
from .registry import (
    ATTENTION_KINDS,
    AttentionKind,
    attention_variants,
    get_attention_kind,
    kernel_kinds,
    parameter_free_kinds,
    reference_attention,
    register_attention_kind,
)
from .weights import (
    SOFTPICK_EPS,
    cog_weights,
    sigmoid_weights,
    softmax1_weights,
    softmax_weights,
    softpick_weights,
)

__all__ = [
    "ATTENTION_KINDS", "LAYER_SELECTIONS", "SOFTPICK_EPS", "Attention", "AttentionCapture", "AttentionKind",
    "CogAttentionFunction", "DifferentialAttention", "attention_variants", "capture_attention",
    "cog_attention", "cog_attention_reference", "cog_weights", "complement", "default_impl", "diff_lambda_init",
    "get_attention_kind", "kernel_kinds", "make_attention", "parameter_free_kinds", "reference_attention",
    "register_attention_kind", "select_layers", "sigmoid_weights", "softmax1_weights", "softmax_weights",
    "softpick_weights",
]
