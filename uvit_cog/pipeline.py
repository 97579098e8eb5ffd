"""The sampling pipelines of every backbone of this toolkit (`uvit_cog.backbones`), with any diffusers scheduler:

- `UViTPipeline`: unconditional or class-conditional (`UViTModel`, `DiTModel`, diffusers' `DiTTransformer2DModel`);
- `UViTText2ImagePipeline`: text-conditional U-ViT / U-ViC (the MS-COCO models), prompts through a text encoder.

Both share one denoising loop (`UViTPipelineBase.denoise`), which adds nothing to the maths of the schedulers:
it draws the initial noise (`init_noise_sigma`), scales the model input (`scale_model_input`), feeds the
scheduler's own timesteps to the model with the condition as named fields (`uvit_cog.conditioning`), runs the
conditional and unconditional halves of classifier-free guidance in one batched forward, and lets
`scheduler.step` interpret the prediction by its configured `prediction_type`. A model trained here therefore
samples with DDPM, DDIM, DPM-Solver++, Euler, UniPC, … built from the saved noise schedule:
`make_scheduler(name, pipe.scheduler.config)`. A flow-matching model samples with the flow schedulers
(`uvit_cog.schedule.FLOW_SCHEDULERS`), which pass the model the timesteps t·1000 it was trained on. A pipeline
records its model's objective (`objective`, from the scheduler it was built with) and refuses to sample with a
scheduler of the other family.

Guidance is diffusers' `uncond + g·(cond − uncond)`. The official U-ViT code writes `cond + s·(cond − uncond)`:
g = 1 + s (U-ViT's MS-COCO s = 1 is `guidance_scale=2.0`; ImageNet-256's s = 0.4 is 1.4).

A saved pipeline directory also carries a small `pipeline.py`, so diffusers' generic loader works too:
`DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import backbones
from .conditioning import Condition, cat_conditions, condition_to, null_class_condition
from .rundir import resolve_pipeline_dir
from .schedule import SCHEDULER_FAMILIES, scheduler_family
from .text import check_text_encoder, encode_prompts

# "latent": the final model-space samples, not decoded (diffusers' convention).
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The `pipeline.py` written into every saved pipeline directory for diffusers' `custom_pipeline` loader, which
# takes the one DiffusionPipeline subclass it finds there: each pipeline writes its own class name.
HUB_PIPELINE_TEMPLATE = '''"""Entry point of a saved uvit-cog pipeline for diffusers' generic loader.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)

The pipeline code itself lives in the `uvit-cog` package (`pip install uvit-cog`); importing it here also
makes the `transformer` component's module (`uvit_cog.model`) importable for diffusers.
"""

from uvit_cog.pipeline import {name}

__all__ = ["{name}"]
'''

ClassLabel = int | str
# What `class_labels` accepts, as DiTPipeline does: a label, or lists / tuples / tensors / arrays of them,
# nested to any depth (diffusers' shared tests batch an input `x` as `[x, x]`).
ClassLabels = ClassLabel | Tensor | np.ndarray | Sequence["ClassLabels"]
# What `prompt` accepts: a string or lists / tuples of them, nested (flattened in order).
Prompts = str | Sequence["Prompts"]
Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[[DiffusionPipeline, int, Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks


def flatten_labels(class_labels: ClassLabels) -> list:
    """The labels of `class_labels` in order, nesting removed: `[[1], [2, "cat"]]` → `[1, 2, "cat"]`."""
    if isinstance(class_labels, (Tensor, np.ndarray)):
        return class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in flatten_labels(item)]
    return [class_labels]


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


class UViTPipelineBase(DiffusionPipeline):
    """What every pipeline of this toolkit shares: the input checks of sampling, the initial noise, the one
    denoising loop with classifier-free guidance, decoding, and saving with diffusers' `pipeline.py` entry point.

    Subclasses turn their own inputs (labels, prompts) into a condition and its null condition (named fields,
    `uvit_cog.conditioning`) and call `denoise` and `postprocess`.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def check_scheduler(self) -> None:
        """Raise if the scheduler samples models of the other objective than this pipeline's model."""
        family, objective = scheduler_family(self.scheduler.config), self.config.objective
        if family != objective:
            raise ValueError(
                f"scheduler {type(self.scheduler).__name__} samples {family} models, but this pipeline's model was "
                f"trained with the {objective} objective: use make_scheduler(name, <the model's saved scheduler "
                f"config>) with one of {sorted(SCHEDULER_FAMILIES[objective])}")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save all components plus `pipeline.py`, the entry point of diffusers' `custom_pipeline` loader."""
        os.makedirs(save_directory, exist_ok=True)
        # Written first so that `push_to_hub=True` uploads it with the components.
        Path(save_directory, "pipeline.py").write_text(HUB_PIPELINE_TEMPLATE.format(name=type(self).__name__))
        super().save_pretrained(save_directory, **kwargs)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per model-space pixel: the VAE's downsampling (2^(levels − 1)), 1 for pixel models."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running (or last) call; a step callback may change `_guidance_scale`."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the running (or last) call batches an unconditional pass (its initial guidance_scale != 1)."""
        return self._do_classifier_free_guidance

    @property
    def num_timesteps(self) -> int:
        """Scheduler timesteps of the running (or last) call."""
        return self._num_timesteps

    def check_sampling_inputs(
        self, num_inference_steps: int, guidance_scale: float, output_type: str, num_images_per_prompt: int,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> None:
        """Raise, before any work, on sampling arguments that every pipeline takes."""
        if not isinstance(num_inference_steps, Integral) or isinstance(num_inference_steps, bool) \
                or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, Real) or isinstance(guidance_scale, bool) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r} (1 disables guidance)")
        if not isinstance(num_images_per_prompt, Integral) or num_images_per_prompt <= 0:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}"
            )

    def prepare_latents(self, batch_size: int, generator: Generator, latents: Tensor | None,
                        device: torch.device) -> Tensor:
        """The initial noise (batch_size, C, H, W) in model space: drawn from `generator` (one per image when a
        list), or `latents` as given; not yet scaled by the scheduler's `init_noise_sigma`."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")
        cfg = self.transformer.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; {batch_size} images need {shape}")
        return latents.to(device=device, dtype=self.transformer.dtype)

    def denoise(
        self, latents: Tensor, condition: Condition, null_condition: Condition | None, guidance_scale: float,
        num_inference_steps: int, generator: Generator = None, callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Tensor:
        """Run the scheduler from the initial noise `latents` to model-space samples: the one denoising loop.

        `condition` holds the model's condition fields for every row of `latents` (empty for unconditional
        models); with guidance (`guidance_scale` != 1) `null_condition`, the same fields' null values, forms the
        unconditional half of each batched forward and the prediction is `uncond + g·(cond − uncond)`.
        """
        device = latents.device
        self._guidance_scale = guidance_scale
        self._do_classifier_free_guidance = do_cfg = guidance_scale != 1.0
        if do_cfg:
            if null_condition is None:
                raise ValueError("classifier-free guidance (guidance_scale != 1) needs the null condition")
            condition = cat_conditions(condition, null_condition)
        condition = condition_to(condition, device, self.transformer.dtype)

        self.check_scheduler()
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        # Flow-matching schedulers start from unit noise and take the latents as they are (no such attributes).
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = scale_input(latents, t)
            if do_cfg:
                model_input = torch.cat([model_input, model_input])
            # Each scheduler's own timestep values and dtype (int for DDPM/DDIM, float for Euler-type, t·1000
            # for flow schedulers).
            timesteps = torch.as_tensor(t, device=device).reshape(1).expand(model_input.shape[0])
            pred = self.transformer(model_input, timesteps, **condition).sample
            if pred.shape[1] == 2 * latents.shape[1]:  # DiT's learned variance: the schedulers' own variances apply
                pred = pred[:, : latents.shape[1]]
            if do_cfg:
                cond, uncond = pred.chunk(2)
                pred = uncond + self._guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
        return latents

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Model-space samples to images in [0, 1] (NCHW): through the VAE for latent models."""
        if self.vae is not None:
            vcfg = self.vae.config
            latents = latents / vcfg.scaling_factor + (getattr(vcfg, "shift_factor", None) or 0.0)
            latents = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (latents / 2 + 0.5).clamp(0, 1)

    def postprocess(self, latents: Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        """The call's output: decoded images as `output_type` says, in an `ImagePipelineOutput` or a tuple."""
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class UViTPipeline(UViTPipelineBase):
    """Sampling pipeline for unconditional and class-conditional U-ViT / U-ViC and DiT models.

    Components: `transformer` (a backbone of `uvit_cog.backbones`), `scheduler` (any diffusers scheduler, built on the
    model's noise schedule) and `vae` (an `AutoencoderKL` for latent models, else None). `objective`
    ("ddpm" or "flow_matching", saved in model_index.json) is the family of the model's schedulers; None
    takes that of `scheduler`.

    Example:
        >>> pipe = UViTPipeline.from_pretrained("runs/cifar10/pipeline")
        >>> pipe.scheduler = make_scheduler("dpm_solver", pipe.scheduler.config)
        >>> images = pipe(class_labels=["cat", "dog"], num_inference_steps=25, guidance_scale=1.5).images
    """

    _optional_components = ["vae"]

    def __init__(
        self, transformer: ModelMixin, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
        objective: str | None = None,
    ) -> None:
        super().__init__()
        if backbones.condition_kind(transformer.config) == "text":
            raise ValueError("this model is text-conditional: sample it with UViTText2ImagePipeline (prompts)")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(objective=objective or scheduler_family(scheduler.config))

    @property
    def num_classes(self) -> int:
        """Real classes of the model (0 = unconditional); label `num_classes` is the null label."""
        return backbones.num_classes(self.transformer.config)

    @property
    def labels(self) -> dict[str, int]:
        """Class name → id from the model's `id2label`; comma-separated synonyms each map to the id."""
        id2label = self.transformer.config.get("id2label") or {}
        return {
            name.strip(): int(idx) for idx, names in id2label.items() for name in names.split(",") if name.strip()
        }

    def get_label_ids(self, class_labels: ClassLabels) -> list[int]:
        """Class ids for ints, class names (from `id2label`) or a mix, in any nesting of lists, tuples, tensors
        or arrays (flattened in order, as DiTPipeline does); a ValueError names any bad label."""
        if self.num_classes == 0:
            raise ValueError("class_labels given to an unconditional model (num_classes=0); leave them out")
        flat = flatten_labels(class_labels)
        if len(flat) == 0:
            raise ValueError("class_labels is empty; give at least one class id or name, or None")
        names = self.labels
        ids = []
        for label in flat:
            if isinstance(label, str):
                if label not in names:
                    known = ", ".join(sorted(names)[:10]) or "none: the model stores no id2label"
                    raise ValueError(f"unknown class name {label!r}; known names include: {known}")
                ids.append(names[label])
            elif isinstance(label, Integral) and not isinstance(label, bool):
                if not 0 <= int(label) < self.num_classes:
                    raise ValueError(
                        f"class label {int(label)} out of range: this model has classes 0..{self.num_classes - 1}"
                    )
                ids.append(int(label))
            else:
                raise ValueError(f"class labels must be ints or class names, got {label!r}")
        return ids

    def check_inputs(
        self,
        batch_size: int,
        class_labels: ClassLabels | None,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> list[int] | None:
        """Validate the sampling arguments before any work; returns the class ids (one per image) or None.

        One label is repeated `batch_size` times; several labels give one image each (`batch_size` must then
        be 1 or their number); every label then gives `num_images_per_prompt` consecutive images.
        """
        self.check_sampling_inputs(num_inference_steps, guidance_scale, output_type, num_images_per_prompt,
                                   callback_on_step_end_tensor_inputs)
        if not isinstance(batch_size, Integral) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if guidance_scale != 1.0 and self.num_classes == 0:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a class-conditional model; this one is unconditional "
                "(num_classes=0): use guidance_scale=1.0"
            )
        if class_labels is None:
            if guidance_scale != 1.0:
                raise ValueError("classifier-free guidance (guidance_scale != 1) needs class_labels")
            return None
        ids = self.get_label_ids(class_labels)
        if len(ids) == 1:
            ids = ids * batch_size
        elif batch_size not in (1, len(ids)):
            raise ValueError(
                f"got {len(ids)} class labels for batch_size={batch_size}; give one label or one per image"
            )
        return [c for c in ids for _ in range(num_images_per_prompt)]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: ClassLabels | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        num_images_per_prompt: int = 1,
        latents: Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size: images to generate; a list of several `class_labels` with the default
                `batch_size=1` sets the batch size to its length.
            class_labels: one label for all images or one per image, as ints or class names
                (`id2label`), in lists, tuples, tensors or arrays of any nesting or shape (flattened in
                order, as DiTPipeline does: `[[1], [1]]` is two images of class 1); None samples
                unconditionally (the null label) from a conditional model.
            num_inference_steps: scheduler steps (Heun-type schedulers call the model about twice per step).
            guidance_scale: classifier-free guidance g in `uncond + g·(cond − uncond)`, applied to all
                channels; 1 disables it (one forward pass of `batch_size` per model call), otherwise
                the conditional and unconditional halves go through one batched forward.
            generator: a torch.Generator or a list with one per image. With a list, each image's
                initial noise (and the step noise of samplers that take a generator, e.g. DDPM,
                Euler-a) comes from its own generator, so an image does not depend on the batch it is in.
            output_type: "pil" (list of PIL images), "np" (float32 NHWC in [0, 1]), "pt" (NCHW in [0, 1])
                or "latent" (the final model-space samples, NCHW, not decoded).
            return_dict: False returns the tuple `(images,)` instead of an `ImagePipelineOutput`.
            callback_on_step_end: called as `fn(pipe, step_index, timestep, tensors)` after each step, with
                `tensors` holding the entries named in `callback_on_step_end_tensor_inputs` (a subset of
                `_callback_tensor_inputs`); a "latents" entry in the returned dict replaces the latents.
                It may also change `pipe._guidance_scale`. A diffusers `PipelineCallback` /
                `MultiPipelineCallbacks` brings its own `tensor_inputs`.
            num_images_per_prompt: images per class label (per batch entry for unconditional sampling),
                consecutive in the output: labels `[a, b]` with 2 give `a, a, b, b`.
            latents: the initial noise (N, C, H, W) in model space instead of drawing it from `generator`;
                scaled by the scheduler's `init_noise_sigma` like drawn noise.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        labels = self.check_inputs(
            batch_size, class_labels, num_inference_steps, guidance_scale, output_type,
            num_images_per_prompt, callback_on_step_end_tensor_inputs,
        )
        batch_size = batch_size * num_images_per_prompt if labels is None else len(labels)
        device = self._execution_device
        latents = self.prepare_latents(batch_size, generator, latents, device)

        # The null label num_classes: backbones without a None default (diffusers' DiT) need it given.
        null = null_class_condition(self.num_classes, batch_size, device) if self.num_classes else {}
        condition = null if labels is None else {"class_labels": torch.tensor(labels, device=device)}
        latents = self.denoise(latents, condition, null, guidance_scale, num_inference_steps, generator,
                               callback_on_step_end, callback_on_step_end_tensor_inputs)
        return self.postprocess(latents, output_type, return_dict)


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


PIPELINES = {cls.__name__: cls for cls in (UViTPipeline, UViTText2ImagePipeline)}


def build_pipeline(
    transformer: ModelMixin, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
    text_encoder: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
    objective: str | None = None,
) -> UViTPipeline | UViTText2ImagePipeline:
    """The pipeline of `transformer`'s condition kind: `UViTText2ImagePipeline` (with the text encoder and its
    tokenizer) for a text-conditional model, else `UViTPipeline`."""
    if backbones.condition_kind(transformer.config) == "text":
        return UViTText2ImagePipeline(transformer, scheduler, vae, text_encoder, tokenizer, objective)
    if text_encoder is not None or tokenizer is not None:
        raise ValueError("a text encoder was given for a model that is not text-conditional")
    return UViTPipeline(transformer, scheduler, vae, objective)


def with_components(pipeline: UViTPipelineBase, **components) -> UViTPipelineBase:
    """A pipeline of the same class sharing `pipeline`'s components and objective, some replaced (e.g. the
    scheduler); `pipeline` itself is left unchanged, and so is its progress-bar setting."""
    swapped = type(pipeline)(**{**pipeline.components, **components}, objective=pipeline.config.objective)
    swapped.register_to_config(_name_or_path=pipeline.name_or_path)  # the same model, from the same place
    swapped.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return swapped


def load_pipeline(path: str | os.PathLike, **kwargs) -> UViTPipeline | UViTText2ImagePipeline:
    """Load the pipeline of a pipeline directory or a training run directory: `UViTPipeline` or
    `UViTText2ImagePipeline`, as its model_index.json names it.

    A run directory gives its final export `RUN/pipeline`, else its latest checkpoint's
    `RUN/checkpoints/step_*/pipeline`. `kwargs` go to `from_pretrained` (e.g. `dtype=torch.float16`).
    Weights are read from safetensors only (`use_safetensors=True` unless overridden): a pickled `.bin` could
    run code when loaded.
    """
    directory = resolve_pipeline_dir(path)
    name = json.loads((directory / "model_index.json").read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{directory} holds a {name} pipeline, not one of this toolkit's ({sorted(PIPELINES)})")
    return PIPELINES[name].from_pretrained(directory, **{"use_safetensors": True, **kwargs})


__all__ = ["OUTPUT_TYPES", "PIPELINES", "UViTPipeline", "UViTPipelineBase", "UViTText2ImagePipeline",
           "build_pipeline", "flatten_prompts", "load_pipeline", "read_prompts", "with_components"]
