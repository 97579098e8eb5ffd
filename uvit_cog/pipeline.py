"""The sampling pipelines of every backbone of this toolkit (`uvit_cog.backbones`), with any diffusers scheduler:

- `UViTPipeline` (here): unconditional or class-conditional (`UViTModel`, `DiTModel`, diffusers'
  `DiTTransformer2DModel`);
- `UViTText2ImagePipeline` (`uvit_cog.text_pipeline`): text-conditional U-ViT / U-ViC, prompts through a text encoder;

both on one denoising loop (`uvit_cog.pipeline_base.UViTPipelineBase`). `load_pipeline` loads either from a pipeline
or training-run directory, `build_pipeline` makes the one a model's condition kind needs.

A saved pipeline directory also carries a small `pipeline.py`, so diffusers' generic loader works too:
`DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch
from diffusers import AutoencoderKL, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import backbones
from .conditioning import null_class_condition
from .pipeline_base import OUTPUT_TYPES, Generator, StepCallback, UViTPipelineBase
from .rundir import resolve_pipeline_dir
from .schedule import scheduler_family
from .text_pipeline import Prompts, UViTText2ImagePipeline, flatten_prompts, read_prompts

ClassLabel = int | str
# What `class_labels` accepts, as DiTPipeline does: a label, or lists / tuples / tensors / arrays of them,
# nested to any depth (diffusers' shared tests batch an input `x` as `[x, x]`).
ClassLabels = ClassLabel | Tensor | np.ndarray | Sequence["ClassLabels"]


def flatten_labels(class_labels: ClassLabels) -> list:
    """The labels of `class_labels` in order, nesting removed: `[[1], [2, "cat"]]` → `[1, 2, "cat"]`."""
    if isinstance(class_labels, (Tensor, np.ndarray)):
        return class_labels.reshape(-1).tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in flatten_labels(item)]
    return [class_labels]


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


# The pipelines' shared names, importable from here as before the split.
__all__ = ["OUTPUT_TYPES", "PIPELINES", "ClassLabel", "ClassLabels", "Generator", "Prompts", "StepCallback",
           "UViTPipeline", "UViTPipelineBase", "UViTText2ImagePipeline", "build_pipeline", "flatten_labels",
           "flatten_prompts", "load_pipeline", "read_prompts", "with_components"]
