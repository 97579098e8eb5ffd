"""Capturing the attention weights every `Attention` layer of a model applies, for analysis (`analyze.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from .modules import Attention


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
