"""The one noise schedule shared by training and sampling, and the scheduler registry.

Training writes `scheduler_config(...)` into the exported pipeline; every sampler is then built from
that same config with `make_scheduler`, so a model trained here samples correctly with any
diffusers scheduler. All values are stored explicitly: diffusers' `from_config` silently drops keys
left at their defaults in an in-memory config, and a default that changes between diffusers
versions must not change a trained model's schedule.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

# Noise schedules of the U-ViT recipes. "linear" is DDPM's (and U-ViT's pixel-space VP-SDE with
# beta_min=0.1, beta_max=20 discretised to 1,000 steps); "scaled_linear" is Stable Diffusion's, used
# by U-ViT's latent ImageNet-256 models.
NOISE_SCHEDULES: dict[str, dict] = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "dpm_solver_single": DPMSolverSinglestepScheduler,
    "deis": DEISMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "kdpm2": KDPM2DiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


def scheduler_config(
    schedule: str = "linear", prediction_type: str = "epsilon", num_train_timesteps: int = 1000,
    clip_sample: bool = False,
) -> dict:
    """A complete, explicit DDPM scheduler config for a noise schedule and training objective.

    `clip_sample` makes the samplers that support it (DDPM, DDIM, ...) clip their x0 prediction to
    [-1, 1], as DDPM's original pixel-space sampler did; it keeps briefly trained pixel models from
    saturating and must stay off for latent models, whose values are not bounded by 1.
    """
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {sorted(NOISE_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    return dict(
        num_train_timesteps=int(num_train_timesteps),
        **NOISE_SCHEDULES[schedule],
        prediction_type=prediction_type,
        variance_type="fixed_small",
        clip_sample=bool(clip_sample),
        clip_sample_range=1.0,
        thresholding=False,
        # "trailing" spacing reaches t = T-1 with few steps (Lin et al. 2024), for every sampler.
        timestep_spacing="trailing",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )


def make_scheduler(name: str, config: Mapping) -> SchedulerMixin:
    """Build the sampler `name` (see `SCHEDULERS`) on the noise schedule `config` of a trained model."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(dict(config))


def training_target(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the model learns to predict at `timesteps`, by the scheduler's `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}; choose one of {PREDICTION_TYPES}")


def sample_timesteps(num: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """Uniform training timesteps in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (num,), generator=generator, device=device)
