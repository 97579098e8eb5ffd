"""`UViTText2ImagePipeline`: text-to-image sampling for text-conditional U-ViT / U-ViC (the paper's MS-COCO models),
on the shared denoising loop (`uvit_cog.pipeline_base`); prompts through a `transformers` text encoder
(`uvit_cog.text`), the empty prompt's features as the unconditional half of guidance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import backbones
from .pipeline_base import Generator, StepCallback, UViTPipelineBase
from .schedule import scheduler_family
from .text import check_text_encoder, encode_prompts

# What `prompt` accepts: a string or lists / tuples of them, nested (flattened in order).
Prompts = str | Sequence["Prompts"]


def flatten_prompts(prompt: Prompts, name: str = "prompt") -> list[str]:
    """The prompts of `prompt` in order, nesting removed; a ValueError names anything that is not a string."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        return [p for item in prompt for p in flatten_prompts(item, name)]
    raise ValueError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}: {prompt!r:.100}")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one a line (a prompts or captions file); refused naming the file when it is
    missing or holds none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist: give a text file with one prompt a line")
    prompts = path.read_text(encoding="utf-8").splitlines()
    if not prompts:
        raise ValueError(f"prompts file {path} is empty: give one prompt a line")
    return prompts


class UViTText2ImagePipeline(UViTPipelineBase):
    r"""Text-to-image sampling for text-conditional U-ViT / U-ViC models (the paper's MS-COCO U-ViC-S/2).

    Components: `transformer` (a `UViTModel` with `text_dim` > 0), `scheduler` (any diffusers scheduler of the
    model's objective), `vae` (an `AutoencoderKL` for latent models, None for pixel-space ones), `text_encoder`
    and `tokenizer` (a `transformers` text encoder: CLIP ViT-L/14's text model for the MS-COCO models, see
    `uvit_cog.text`). Prompts are encoded as U-ViT does: padded to the model's `num_text_tokens`, no mask, the
    last hidden state. The unconditional half of guidance is the empty prompt's features (as the official code
    and its training's condition dropout), or `negative_prompt`'s when given.

    Example:
        >>> from uvit_cog import UViTText2ImagePipeline
        >>> from uvit_cog.schedule import make_scheduler
        >>> pipe = UViTText2ImagePipeline.from_pretrained("converted/mscoco_uvic_small")
        >>> pipe.scheduler = make_scheduler("dpm_solver", pipe.scheduler.config)
        >>> image = pipe("A red bus driving down a city street", num_inference_steps=50, guidance_scale=2.0).images[0]
        >>> image.save("bus.png")
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self, transformer: ModelMixin, scheduler: SchedulerMixin, vae: AutoencoderKL | None,
        text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, objective: str | None = None,
    ) -> None:
        super().__init__()
        # Any component may be None, as in diffusers' pipelines: one holding only the text encoder and tokenizer
        # computes `prompt_embeds` for another that holds no text encoder (`encode_prompt`).
        if transformer is not None and backbones.condition_kind(transformer.config) != "text":
            raise ValueError("this model is not text-conditional (text_dim=0): sample it with UViTPipeline")
        if transformer is not None and text_encoder is not None and tokenizer is not None:
            check_text_encoder(text_encoder, tokenizer, transformer.config.text_dim,
                               transformer.config.num_text_tokens)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        if objective is None and scheduler is not None:
            objective = scheduler_family(scheduler.config)
        self.register_to_config(objective=objective)

    @property
    def num_text_tokens(self) -> int:
        """Tokens per prompt: the model's `num_text_tokens`. Without a transformer, the text encoder's positions
        (CLIP's 77, which every U-ViT MS-COCO model reads); a model of another length then refuses the features
        by their shape."""
        if self.transformer is not None:
            return self.transformer.config.num_text_tokens
        positions = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        if positions is None:
            raise ValueError("this pipeline has no transformer and its text encoder names no max_position_embeddings: "
                             "the number of text tokens is unknown; encode prompts with the model's pipeline")
        return int(positions)

    def _encode(self, prompts: list[str], device: torch.device) -> Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer: pass prompt_embeds (and "
                             "negative_prompt_embeds for guidance) instead of prompts")
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.num_text_tokens, device)

    def encode_prompt(
        self,
        prompt: Prompts | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Prompts | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The features of the prompts and of the unconditional branch, each (N · num_images_per_prompt, L, C).

        `prompt_embeds` replace `prompt`. The unconditional features (None without guidance) are
        `negative_prompt_embeds`, else those of `negative_prompt` (one for all prompts, or one per prompt),
        else the empty prompt's: U-ViT's null context.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompt_embeds = self._encode(flatten_prompts(prompt), device)
        # The model's dtype; a pipeline without a transformer keeps the text encoder's.
        dtype = self.transformer.dtype if self.transformer is not None else prompt_embeds.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        n = len(prompt_embeds)
        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        elif negative_prompt_embeds is None:
            negatives = [""] if negative_prompt is None else flatten_prompts(negative_prompt, "negative_prompt")
            if len(negatives) not in (1, n):
                raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts; give one or one each")
            negative_prompt_embeds = self._encode(negatives, device)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype).expand(n, -1, -1)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        # diffusers' shared tests pass what this returns to `__call__` by these names: keep them its parameters'.
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(
        self,
        prompt: Prompts | None,
        negative_prompt: Prompts | None,
        prompt_embeds: Tensor | None,
        negative_prompt_embeds: Tensor | None,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> None:
        """Validate the sampling arguments before any work (the prompts themselves: `flatten_prompts`)."""
        self.check_sampling_inputs(num_inference_steps, guidance_scale, output_type, num_images_per_prompt,
                                   callback_on_step_end_tensor_inputs)
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give at most one of negative_prompt and negative_prompt_embeds")
        if prompt is not None:
            flat = flatten_prompts(prompt)
            if not flat:
                raise ValueError("prompt is empty; give at least one prompt")
        if negative_prompt is not None:
            flatten_prompts(negative_prompt, "negative_prompt")
        cfg = self.transformer.config
        expected = (cfg.num_text_tokens, cfg.text_dim)
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.dim() != 3 or tuple(embeds.shape[1:]) != expected):
                raise ValueError(f"{name} must be (N, {expected[0]}, {expected[1]}) for this model, got "
                                 f"{tuple(embeds.shape)}")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and len(negative_prompt_embeds) not in (1, len(prompt_embeds)):
            raise ValueError(f"negative_prompt_embeds has {len(negative_prompt_embeds)} rows for "
                             f"{len(prompt_embeds)} prompts; give one or one each")
        size = cfg.sample_size * self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise ValueError(f"{name}={value}, but this model makes {size}x{size} images only (its position "
                                 f"embedding is fixed): leave {name} out or set it to {size}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompts | None = None,
        negative_prompt: Prompts | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: Generator = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Generate images from prompts.

        Args:
            prompt: a prompt or a list of prompts (nested lists are flattened in order); or give
                `prompt_embeds`.
            negative_prompt: the unconditional branch's prompt instead of the empty prompt: one for all prompts
                or one per prompt. Only used with guidance.
            num_inference_steps: scheduler steps (Heun-type schedulers call the model about twice per step).
            guidance_scale: classifier-free guidance g in diffusers' `uncond + g·(cond − uncond)`; 1 disables
                it. The official U-ViT scale s is g − 1: the MS-COCO protocol's s = 1 is the default 2.0.
            num_images_per_prompt: images per prompt, consecutive in the output.
            height, width: accepted only when equal to the model's image size (its position embedding is
                fixed); None takes it.
            generator: a torch.Generator or a list with one per image (each image's noise from its own
                generator, so an image does not depend on the batch it is in).
            latents: the initial noise (N, C, H, W) in model space instead of drawing it from `generator`.
            prompt_embeds: text features (N, num_text_tokens, text_dim) instead of `prompt`.
            negative_prompt_embeds: the unconditional branch's features (1 or N rows) instead of
                `negative_prompt`; with neither, the empty prompt's features.
            output_type: "pil", "np" (float32 NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent".
            return_dict: False returns the tuple `(images,)` instead of an `ImagePipelineOutput`.
            callback_on_step_end: called as `fn(pipe, step_index, timestep, tensors)` after each step with the
                entries named in `callback_on_step_end_tensor_inputs`; a "latents" entry in the returned dict
                replaces the latents; it may change `pipe._guidance_scale`.

        Example:
            >>> pipe = UViTText2ImagePipeline.from_pretrained("converted/mscoco_uvit_small")
            >>> images = pipe(["a cat on a sofa", "two zebras"], num_images_per_prompt=2).images  # 4 images
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                          num_inference_steps, guidance_scale, output_type, num_images_per_prompt,
                          callback_on_step_end_tensor_inputs)
        device = self._execution_device
        embeds, negative = self.encode_prompt(prompt, device, num_images_per_prompt, guidance_scale != 1.0,
                                              negative_prompt, prompt_embeds, negative_prompt_embeds)
        latents = self.prepare_latents(len(embeds), generator, latents, device)
        condition = {"encoder_hidden_states": embeds}
        null = None if negative is None else {"encoder_hidden_states": negative}
        latents = self.denoise(latents, condition, null, guidance_scale, num_inference_steps, generator,
                               callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self.postprocess(latents, output_type, return_dict)


__all__ = ["Prompts", "UViTText2ImagePipeline", "flatten_prompts", "read_prompts"]
