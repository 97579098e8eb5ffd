"""uvit-cog: U-ViT diffusion transformers with Cog Attention (attention weights that can be negative)."""

from .attention import (
    ATTENTION_KINDS,
    Attention,
    attention_variants,
    capture_attention,
    cog_attention,
    cog_attention_reference,
    cog_weights,
)
from .dit import DiTModel
from .model import PRESETS, UViTModel, UViTModelOutput
from .pipeline import UViTPipeline, UViTText2ImagePipeline, load_pipeline
from .processors import load_model, set_attention

__all__ = [
    "ATTENTION_KINDS",
    "Attention",
    "DiTModel",
    "PRESETS",
    "UViTModel",
    "UViTModelOutput",
    "UViTPipeline",
    "UViTText2ImagePipeline",
    "attention_variants",
    "capture_attention",
    "cog_attention",
    "cog_attention_reference",
    "cog_weights",
    "load_model",
    "load_pipeline",
    "set_attention",
]
