"""The one denoising loop every pipeline of this toolkit shares (`UViTPipelineBase`), with any diffusers scheduler.

It adds nothing to the maths of the schedulers: it draws the initial noise (`init_noise_sigma`), scales the model
input (`scale_model_input`), feeds the scheduler's own timesteps to the model with the condition as named fields
(`uvit_cog.conditioning`), runs the conditional and unconditional halves of classifier-free guidance in one batched
forward, and lets `scheduler.step` interpret the prediction by its configured `prediction_type`. A model trained
here therefore samples with DDPM, DDIM, DPM-Solver++, Euler, UniPC, … built from the saved noise schedule:
`make_scheduler(name, pipe.scheduler.config)`. A flow-matching model samples with the flow schedulers
(`uvit_cog.schedule.FLOW_SCHEDULERS`), which pass the model the timesteps t·1000 it was trained on. A pipeline
records its model's objective (`objective`, from the scheduler it was built with) and refuses to sample with a
scheduler of the other family.

Guidance is diffusers' `uncond + g·(cond − uncond)`. The official U-ViT code writes `cond + s·(cond − uncond)`:
g = 1 + s (U-ViT's MS-COCO s = 1 is `guidance_scale=2.0`; ImageNet-256's s = 0.4 is 1.4).

The pipelines themselves: `uvit_cog.pipeline` (class-conditional and unconditional; loading) and
`uvit_cog.text_pipeline` (text-to-image).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .conditioning import Condition, cat_conditions, condition_to
from .schedule import SCHEDULER_FAMILIES, scheduler_family

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

Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[[DiffusionPipeline, int, Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks


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


__all__ = ["OUTPUT_TYPES", "Generator", "StepCallback", "UViTPipelineBase"]
