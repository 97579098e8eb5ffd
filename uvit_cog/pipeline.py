"""`UViTPipeline`: class-conditional or unconditional sampling from a `UViTModel` with any diffusers scheduler.

The pipeline adds nothing to the maths of the schedulers: it draws the initial noise
(`init_noise_sigma`), scales the model input (`scale_model_input`), feeds the scheduler's own
timesteps to the model and lets `scheduler.step` interpret the prediction by its configured
`prediction_type`. A model trained here therefore samples with DDPM, DDIM, DPM-Solver++, Euler,
UniPC, … built from the saved noise schedule: `make_scheduler(name, pipe.scheduler.config)`.

A saved pipeline directory also carries a small `pipeline.py`, so diffusers' generic loader works too:
`DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)`.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .model import UViTModel
from .rundir import resolve_pipeline_dir

OUTPUT_TYPES = ("pil", "np", "pt")
# The file written into every saved pipeline directory for diffusers' `custom_pipeline` loader.
HUB_PIPELINE_FILE = Path(__file__).with_name("pipeline_template.py")

ClassLabel = int | str
Generator = torch.Generator | list[torch.Generator] | None


class UViTPipeline(DiffusionPipeline):
    """Sampling pipeline for U-ViT / U-ViC.

    Components: `transformer` (a `UViTModel`), `scheduler` (any diffusers scheduler, built on the
    model's noise schedule) and `vae` (an `AutoencoderKL` for latent models, else None).

    Example:
        >>> pipe = UViTPipeline.from_pretrained("runs/cifar10/pipeline")
        >>> pipe.scheduler = make_scheduler("dpm_solver", pipe.scheduler.config)
        >>> images = pipe(class_labels=["cat", "dog"], num_inference_steps=25, guidance_scale=1.5).images
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self, transformer: UViTModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save all components plus `pipeline.py`, the entry point of diffusers' `custom_pipeline` loader."""
        os.makedirs(save_directory, exist_ok=True)
        # Written first so that `push_to_hub=True` uploads it with the components.
        shutil.copyfile(HUB_PIPELINE_FILE, os.path.join(save_directory, "pipeline.py"))
        super().save_pretrained(save_directory, **kwargs)

    @property
    def num_classes(self) -> int:
        """Real classes of the model (0 = unconditional); label `num_classes` is the null label."""
        return int(self.transformer.config.num_classes)

    @property
    def labels(self) -> dict[str, int]:
        """Class name → id from the model's `id2label`; comma-separated synonyms each map to the id."""
        id2label = self.transformer.config.id2label or {}
        return {
            name.strip(): int(idx) for idx, names in id2label.items() for name in names.split(",") if name.strip()
        }

    def get_label_ids(self, class_labels: ClassLabel | Sequence[ClassLabel] | Tensor) -> list[int]:
        """Class ids for ints, class names (from `id2label`) or a mix; a ValueError names any bad label."""
        if isinstance(class_labels, Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (str, Integral)):
            class_labels = [class_labels]
        if self.num_classes == 0:
            raise ValueError("class_labels given to an unconditional model (num_classes=0); leave them out")
        if len(class_labels) == 0:
            raise ValueError("class_labels is empty; give at least one class id or name, or None")
        names = self.labels
        ids = []
        for label in class_labels:
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
        class_labels: ClassLabel | Sequence[ClassLabel] | Tensor | None,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str = "pil",
    ) -> list[int] | None:
        """Validate the sampling arguments before any work; returns the class ids (one per image) or None."""
        if not isinstance(num_inference_steps, Integral) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not isinstance(batch_size, Integral) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
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
            return ids * batch_size
        if batch_size not in (1, len(ids)):
            raise ValueError(
                f"got {len(ids)} class labels for batch_size={batch_size}; give one label or one per image"
            )
        return ids

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: ClassLabel | Sequence[ClassLabel] | Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size: images to generate; a list of several `class_labels` with the default
                `batch_size=1` sets the batch size to its length.
            class_labels: one label for all images or one per image, as ints or class names
                (`id2label`); None samples unconditionally (the null label) from a conditional model.
            num_inference_steps: scheduler steps (Heun-type schedulers call the model about twice per step).
            guidance_scale: classifier-free guidance g in `uncond + g·(cond − uncond)`, applied to all
                channels; 1 disables it (one forward pass of `batch_size` per model call), otherwise
                the conditional and unconditional halves go through one batched forward.
            generator: a torch.Generator or a list with one per image. With a list, each image's
                initial noise (and the step noise of samplers that take a generator, e.g. DDPM,
                Euler-a) comes from its own generator, so an image does not depend on the batch it is in.
            output_type: "pil" (list of PIL images), "np" (float32 NHWC in [0, 1]) or "pt" (NCHW in [0, 1]).
            callback_on_step_end: called as `fn(pipe, step_index, timestep, {"latents": ...})` after each
                step; a "latents" entry in the returned dict replaces the latents.
        """
        labels = self.check_inputs(batch_size, class_labels, num_inference_steps, guidance_scale, output_type)
        if labels is not None:
            batch_size = len(labels)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")

        device = self._execution_device
        cfg = self.transformer.config
        do_cfg = guidance_scale != 1.0
        if labels is None:
            model_labels = None  # conditional model: null labels inside the model; unconditional: none
        else:
            model_labels = torch.tensor(labels, device=device)
            if do_cfg:
                model_labels = torch.cat([model_labels, torch.full_like(model_labels, cfg.num_classes)])

        latents = randn_tensor(
            (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            generator=generator,
            device=device,
            dtype=self.transformer.dtype,
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            if do_cfg:
                model_input = torch.cat([model_input, model_input])
            # Each scheduler's own timestep values and dtype (int for DDPM/DDIM, float for Euler-type).
            timesteps = torch.as_tensor(t, device=device).reshape(1).expand(model_input.shape[0])
            pred = self.transformer(model_input, timesteps, class_labels=model_labels).sample
            if do_cfg:
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).pop("latents", latents)

        images = self.decode_latents(latents)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Model-space samples to images in [0, 1] (NCHW): through the VAE for latent models."""
        if self.vae is not None:
            vcfg = self.vae.config
            latents = latents / vcfg.scaling_factor + (getattr(vcfg, "shift_factor", None) or 0.0)
            latents = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (latents / 2 + 0.5).clamp(0, 1)


def load_pipeline(path: str | os.PathLike, **kwargs) -> UViTPipeline:
    """Load a `UViTPipeline` from a pipeline directory or a training run directory.

    A run directory gives its final export `RUN/pipeline`, else its latest checkpoint's
    `RUN/checkpoints/step_*/pipeline`. `kwargs` go to `from_pretrained` (e.g. `dtype=torch.float16`).
    """
    return UViTPipeline.from_pretrained(resolve_pipeline_dir(path), **kwargs)


__all__ = ["UViTPipeline", "load_pipeline", "OUTPUT_TYPES"]
