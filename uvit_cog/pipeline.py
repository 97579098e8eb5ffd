"""`UViTPipeline`: class-conditional or unconditional sampling from any backbone of this toolkit (`UViTModel`,
`DiTModel`, diffusers' `DiTTransformer2DModel`: `uvit_cog.backbones`) with any diffusers scheduler.

The pipeline adds nothing to the maths of the schedulers: it draws the initial noise
(`init_noise_sigma`), scales the model input (`scale_model_input`), feeds the scheduler's own
timesteps to the model and lets `scheduler.step` interpret the prediction by its configured
`prediction_type`. A model trained here therefore samples with DDPM, DDIM, DPM-Solver++, Euler,
UniPC, … built from the saved noise schedule: `make_scheduler(name, pipe.scheduler.config)`. A flow-matching
model samples with the flow schedulers (`uvit_cog.schedule.FLOW_SCHEDULERS`: flow Euler / Heun / LCM, and
DPM-Solver and UniPC in their flow mode), which pass the model the timesteps t·1000 it was trained on.
The pipeline records its model's objective (`objective`, from the scheduler it was built with) and refuses
to sample with a scheduler of the other family.

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

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from . import backbones
from .rundir import resolve_pipeline_dir
from .schedule import SCHEDULER_FAMILIES, scheduler_family

# "latent": the final model-space samples, not decoded (diffusers' convention).
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The file written into every saved pipeline directory for diffusers' `custom_pipeline` loader.
HUB_PIPELINE_FILE = Path(__file__).with_name("pipeline_template.py")

ClassLabel = int | str
# What `class_labels` accepts, as DiTPipeline does: a label, or lists / tuples / tensors / arrays of them,
# nested to any depth (diffusers' shared tests batch an input `x` as `[x, x]`).
ClassLabels = ClassLabel | Tensor | np.ndarray | Sequence["ClassLabels"]
Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[[DiffusionPipeline, int, Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks


def flatten_labels(class_labels: ClassLabels) -> list:
    """The labels of `class_labels` in order, nesting removed: `[[1], [2, "cat"]]` → `[1, 2, "cat"]`."""
    if isinstance(class_labels, (Tensor, np.ndarray)):
        return class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in flatten_labels(item)]
    return [class_labels]


class UViTPipeline(DiffusionPipeline):
    """Sampling pipeline for U-ViT / U-ViC.

    Components: `transformer` (a backbone of `uvit_cog.backbones`), `scheduler` (any diffusers scheduler, built on the
    model's noise schedule) and `vae` (an `AutoencoderKL` for latent models, else None). `objective`
    ("ddpm" or "flow_matching", saved in model_index.json) is the family of the model's schedulers; None
    takes that of `scheduler`.

    Example:
        >>> pipe = UViTPipeline.from_pretrained("runs/cifar10/pipeline")
        >>> pipe.scheduler = make_scheduler("dpm_solver", pipe.scheduler.config)
        >>> images = pipe(class_labels=["cat", "dog"], num_inference_steps=25, guidance_scale=1.5).images
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self, transformer: ModelMixin, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
        objective: str | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(objective=objective or scheduler_family(scheduler.config))

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
        shutil.copyfile(HUB_PIPELINE_FILE, os.path.join(save_directory, "pipeline.py"))
        super().save_pretrained(save_directory, **kwargs)

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
        if not isinstance(num_inference_steps, Integral) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not isinstance(batch_size, Integral) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
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
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")

        device = self._execution_device
        cfg = self.transformer.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; {batch_size} images need {shape}")
        else:
            latents = latents.to(device=device, dtype=self.transformer.dtype)

        self._guidance_scale = guidance_scale
        self._do_classifier_free_guidance = do_cfg = guidance_scale != 1.0
        null = self.num_classes  # the null label; backbones without a None default (diffusers' DiT) need it given
        if labels is None:
            model_labels = None if null == 0 else torch.full((batch_size,), null, device=device)
        else:
            model_labels = torch.tensor(labels, device=device)
            if do_cfg:
                model_labels = torch.cat([model_labels, torch.full_like(model_labels, null)])

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
            pred = self.transformer(model_input, timesteps, class_labels=model_labels).sample
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
    Weights are read from safetensors only (`use_safetensors=True` unless overridden): a pickled `.bin` could
    run code when loaded.
    """
    return UViTPipeline.from_pretrained(resolve_pipeline_dir(path), **{"use_safetensors": True, **kwargs})


__all__ = ["UViTPipeline", "load_pipeline", "OUTPUT_TYPES"]
