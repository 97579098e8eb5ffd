"""The built-in attention kinds, each declared once.

Every kind maps the scores `s = q kᵀ · scale` of one query row to weights `w` and returns `w v`:

    cog        w = sign(s) · softmax(|s|)                  (Lv et al. 2024, arXiv 2411.07176)
    softmax    w = softmax(s)                              (SDPA)
    sigmoid    w = σ(s + b),  b = −log M                   (Ramapuram et al. 2024, arXiv 2409.04431)
    softpick   w = ReLU(eˢ − 1) / (Σ|eˢ − 1| + ε)          (Zuhri et al. 2025, arXiv 2504.20966)
    softmax1   w = eˢ / (e^c + Σ eˢ),  c = 0 or learned    ("off-by-one" softmax, a sink; Miller 2023)

and the kinds with parameters wrap one of these: an output gate σ(x W_g) per head or per channel
(Qiu et al. 2025, arXiv 2505.06708) and differential attention (Ye et al. 2024, arXiv 2410.05258).
A new kind is one more `register_attention_kind(...)` (docs/attention.md shows one, with its row map).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..kernels import row_maps
from .lean import lean_cog_attention
from .registry import reference_attention, register_attention_kind
from .weights import SOFTPICK_EPS, cog_weights, sigmoid_weights, softmax1_weights, softmax_weights, softpick_weights


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None,
                   dropout_p: float) -> Tensor:
    """PyTorch's SDPA, softmax's default: one fused call, with backends (flash, cuDNN) that ours do not replace.

    A row with no kept key gives zeros, as SDPA's CPU and flash backends do.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


cog_attention = register_attention_kind(
    name="cog", formula="w = sign(s)·softmax(|s|)", reference="Lv et al. 2024, arXiv 2411.07176",
    negative_weights=True, weights=cog_weights, row_map=row_maps.COG, implementations={"torch": lean_cog_attention},
).function
register_attention_kind(
    name="softmax", formula="w = softmax(s)", reference="Vaswani et al. 2017", weights=softmax_weights,
    row_map=row_maps.SOFTMAX, implementations={"sdpa": sdpa_attention}, default_impl="sdpa",
)
register_attention_kind(
    name="sigmoid", formula="w = σ(s − log M)", reference="Ramapuram et al. 2024, arXiv 2409.04431", sparse=True,
    weights=sigmoid_weights, arguments={"bias": None}, row_map=row_maps.SIGMOID,  # bias None: b = −log M
)
register_attention_kind(
    name="softpick", formula="w = ReLU(eˢ − 1) / (Σ|eˢ − 1| + ε)", reference="Zuhri et al. 2025, arXiv 2504.20966",
    sparse=True, weights=softpick_weights, arguments={"eps": SOFTPICK_EPS}, row_map=row_maps.SOFTPICK,
)
register_attention_kind(
    name="softmax1", formula="w = eˢ / (1 + Σeˢ)", reference="Miller 2023, \"Attention is off by one\"", sink=True,
    weights=softmax1_weights, arguments={"sink": 0.0}, row_map=row_maps.SOFTMAX1,
)
register_attention_kind(
    name="softmax1_sink", formula="w = eˢ / (e^{c_h} + Σeˢ), c_h learned per head",
    reference="Miller 2023; Xiao et al. 2023", sink=True, base="softmax1", learned_sink=True,
)
register_attention_kind(
    name="gated", formula="out = softmax(s) v ⊙ σ(x W_g), per channel", reference="Qiu et al. 2025, arXiv 2505.06708",
    base="softmax", gate="elementwise",
)
register_attention_kind(
    name="gated_headwise", formula="out = softmax(s) v ⊙ σ(x W_g), one gate per head",
    reference="Qiu et al. 2025, arXiv 2505.06708", base="softmax", gate="headwise",
)
register_attention_kind(
    name="cog_gated", formula="out = sign(s)·softmax(|s|) v ⊙ σ(x W_g), per channel",
    reference="Lv et al. 2024 + Qiu et al. 2025", negative_weights=True, base="cog", gate="elementwise",
)
register_attention_kind(
    name="sigmoid_gated", formula="out = σ(s − log M) v ⊙ σ(x W_g), per channel",
    reference="Ramapuram et al. 2024 + Qiu et al. 2025", sparse=True, base="sigmoid", gate="elementwise",
)
register_attention_kind(
    name="diff", formula="out = RMSNorm((softmax(s₁) − λ softmax(s₂)) v)·(1 − λ_init)",
    reference="Ye et al. 2024, arXiv 2410.05258", negative_weights=True, base="softmax", differential=True,
)

def cog_attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                            scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """Cog attention written plainly and differentiated by autograd: the specification the fast paths match."""
    return reference_attention("cog", q, k, v, attn_mask, scale, dropout_p)
