"""uvit-cog: U-ViT diffusion transformers with Cog Attention (attention weights that can be negative)."""

from .attention import Attention, capture_attention, cog_attention, cog_attention_reference, cog_weights
from .model import PRESETS, UViTModel, UViTModelOutput
from .pipeline import UViTPipeline, load_pipeline

__all__ = [
    "Attention",
    "PRESETS",
    "UViTModel",
    "UViTModelOutput",
    "UViTPipeline",
    "capture_attention",
    "cog_attention",
    "cog_attention_reference",
    "cog_weights",
    "load_pipeline",
]
