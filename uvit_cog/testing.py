"""Tiny random components for tests and contract checks: models, a VAE and a CLIP text encoder built here, so
nothing is downloaded and every piece loads and saves through the same code path as a real one.

The test suite (tests/conftest.py) and `scripts/diffusers_pipeline_tests.py` (diffusers' own pipeline test
mixins, run on these pipelines) build their dummy pipelines from these, so both check the same objects.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .model import UViTModel
from .pipeline import UViTPipeline, UViTPipelineBase, UViTText2ImagePipeline
from .schedule import make_scheduler, scheduler_config
from .text import byte_level_clip_tokenizer, random_text_encoder_config

# Class names of `tiny_model` (3 classes): id 1 has a synonym.
TINY_NAMES = {0: "cat", 1: "dog, puppy", 2: "bird"}


def tiny_model(num_classes: int = 3, **overrides) -> UViTModel:
    """A randomly initialised (seed 0) tiny `UViTModel`: 8x8 RGB, 2 blocks; 3 classes named by `TINY_NAMES`."""
    torch.manual_seed(0)
    cfg = dict(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)
    if num_classes == 3:
        cfg["id2label"] = TINY_NAMES
    return UViTModel(**{**cfg, **overrides}).eval()


def tiny_vae() -> AutoencoderKL:
    """A randomly initialised (seed 0) AutoencoderKL: downsampling by 2, 4 latent channels."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    ).eval()


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer logic over a byte-level vocabulary (514 ids): `uvit_cog.text.byte_level_clip_tokenizer`."""
    return byte_level_clip_tokenizer()


def tiny_clip_text_config(hidden_size: int = 32) -> CLIPTextConfig:
    """A 2-layer CLIP text model's config over `tiny_clip_tokenizer`'s vocabulary, 77 positions as CLIP's."""
    return random_text_encoder_config(hidden_size, max_length=77)


def tiny_t2i_components(scheduler: str = "ddim", vae: AutoencoderKL | None = None, num_text_tokens: int = 8,
                        **overrides) -> dict:
    """The components of a `UViTText2ImagePipeline`: a tiny text-conditional `tiny_model` (`text_dim` 32, its
    input channels the VAE's latent channels, else RGB), a random CLIP text model of width 32 (seed 0) with
    `tiny_clip_tokenizer`, `vae`, and `scheduler` on a linear ε schedule."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_clip_text_config()).eval()
    in_channels = vae.config.latent_channels if vae is not None else 3
    model = tiny_model(num_classes=0, text_dim=32, num_text_tokens=num_text_tokens, in_channels=in_channels,
                       **overrides)
    return dict(transformer=model, scheduler=make_scheduler(scheduler, scheduler_config("linear", "epsilon")),
                vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer())


# ----------------------------------------------------------------------------------------------------------
# diffusers' pipeline-test pattern (`get_dummy_components`, `get_dummy_inputs`): latent models through
# `tiny_vae` (8x8x4 latents, 16x16 images), DDIM, 2 steps, guidance on, as diffusers' PixArt-alpha and DiT tests.


def dummy_components(pipeline_class: type[UViTPipelineBase]) -> dict:
    """Fresh components of `pipeline_class` (`UViTText2ImagePipeline` or `UViTPipeline`) for contract checks."""
    if pipeline_class is UViTText2ImagePipeline:
        # 77 text tokens, as U-ViT's MS-COCO models read CLIP: a pipeline holding only the text encoder pads
        # prompts to its positions.
        return tiny_t2i_components("ddim", vae=tiny_vae(), num_text_tokens=77)
    if pipeline_class is UViTPipeline:
        return dict(transformer=tiny_model(3, in_channels=4),
                    scheduler=make_scheduler("ddim", scheduler_config("linear", "epsilon")), vae=tiny_vae())
    raise ValueError(f"no dummy components for {pipeline_class!r}; give UViTText2ImagePipeline or UViTPipeline")


def dummy_inputs(pipeline_class: type[UViTPipelineBase], generator: torch.Generator) -> dict:
    """Call arguments of `pipeline_class` for contract checks: one prompt (or class label), 2 steps, guidance,
    numpy output."""
    common = dict(generator=generator, num_inference_steps=2, output_type="np")
    if pipeline_class is UViTText2ImagePipeline:
        return dict(prompt="A painting of a squirrel eating a burger", guidance_scale=5.0, **common)
    if pipeline_class is UViTPipeline:
        return dict(class_labels=[1], guidance_scale=4.0, **common)
    raise ValueError(f"no dummy inputs for {pipeline_class!r}; give UViTText2ImagePipeline or UViTPipeline")


__all__ = ["TINY_NAMES", "dummy_components", "dummy_inputs", "tiny_clip_text_config", "tiny_clip_tokenizer",
           "tiny_model", "tiny_t2i_components", "tiny_vae"]
