"""The noise schedules training shares with sampling, and the scheduler registry (the objectives that train on
them: `uvit_cog.objectives`).

Two objectives (`OBJECTIVES`), each a family of diffusers schedulers:

- "ddpm": ε / v / x0 prediction on a variance-preserving DDPM schedule, x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε,
  integer timesteps 0..T−1 (`DDPMObjective`, samplers `SCHEDULERS`).
- "flow_matching": the rectified-flow / linear interpolant x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1), velocity
  target v = ε − x0, in the sign convention of SD3 and diffusers' flow schedulers (t = 1 is pure noise,
  sampling integrates dx/dt = v from t = 1 down to 0); the model sees the timestep t·T that those
  schedulers pass it (`FlowMatchingObjective`, samplers `FLOW_SCHEDULERS`).

Training writes `scheduler_config(...)` into the exported pipeline; every sampler is then built from that
same config with `make_scheduler`, which knows the family of the config and refuses a sampler of the other
family. All values are stored explicitly: diffusers' `from_config` silently drops keys left at their
defaults in an in-memory config, and a default that changes between diffusers versions must not change a
trained model's schedule.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

OBJECTIVES = ("ddpm", "flow_matching")
T_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "min_snr")

# Noise schedules of the U-ViT recipes. "linear" is DDPM's (and U-ViT's pixel-space VP-SDE with
# beta_min=0.1, beta_max=20 discretised to 1,000 steps); "scaled_linear" is Stable Diffusion's, used
# by U-ViT's latent ImageNet-256 models.
NOISE_SCHEDULES: dict[str, dict] = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02),
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION = "flow_prediction"  # diffusers' name for the velocity ε − x0

# The samplers of DDPM-objective models.
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
# The samplers of flow-matching models: diffusers' flow-matching schedulers, and the multistep solvers whose
# flow mode (use_flow_sigmas, prediction_type="flow_prediction") integrates down to t = 0. Not listed: DEIS
# (its flow mode in diffusers 0.42 ends at t = 1/steps: the last sigma is repeated, not 0, so it returns a noisy
# sample), SA-Solver (not in the DDPM registry either), FlowMapEuler (needs a flow-map model), PiFlow (needs
# Gaussian-mixture outputs) and Helios (video), which sample other kinds of model.
FLOW_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "flow_euler": FlowMatchEulerDiscreteScheduler,
    "flow_heun": FlowMatchHeunDiscreteScheduler,
    "flow_lcm": FlowMatchLCMScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "dpm_solver_single": DPMSolverSinglestepScheduler,
    "unipc": UniPCMultistepScheduler,
}
SCHEDULER_FAMILIES: dict[str, dict[str, type[SchedulerMixin]]] = {"ddpm": SCHEDULERS, "flow_matching": FLOW_SCHEDULERS}
SCHEDULER_NAMES = sorted(set(SCHEDULERS) | set(FLOW_SCHEDULERS))
# What a pipeline is exported with: DDPM's own sampler, and diffusers' flow Euler (what SD3 and Flux ship).
DEFAULT_SCHEDULERS = {"ddpm": "ddpm", "flow_matching": "flow_euler"}


# ----------------------------------------------------------------------------------------------------------
# Scheduler configs and the registry


def scheduler_config(
    schedule: str | None = None, prediction_type: str | None = None, num_train_timesteps: int = 1000,
    clip_sample: bool = False, objective: str = "ddpm", shift: float = 1.0,
) -> dict:
    """A complete, explicit scheduler config for a training objective.

    "ddpm": a DDPM config for the noise `schedule` (default "linear") and `prediction_type` (default
    "epsilon"). `clip_sample` makes the samplers that support it (DDPM, DDIM, ...) clip their x0 prediction to
    [-1, 1], as DDPM's original pixel-space sampler did; it keeps briefly trained pixel models from saturating
    and must stay off for latent models, whose values are not bounded by 1.
    "flow_matching": `flow_scheduler_config(num_train_timesteps, shift)`; it has no beta schedule, always
    predicts the velocity and never clips, so `schedule`, `prediction_type` (other than "flow_prediction")
    and `clip_sample` are refused.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if objective == "flow_matching":
        problems = [f"{name}={value!r}" for name, value, ok in (
            ("schedule", schedule, schedule is None),
            ("prediction_type", prediction_type, prediction_type in (None, FLOW_PREDICTION)),
            ("clip_sample", clip_sample, not clip_sample)) if not ok]
        if problems:
            raise ValueError(f"{', '.join(problems)} do(es) not apply to objective='flow_matching', which has no "
                             "beta schedule, always predicts the velocity ε − x0 and never clips: leave schedule "
                             "and prediction_type unset (null) and clip_sample false")
        return flow_scheduler_config(num_train_timesteps, shift)
    schedule, prediction_type = schedule or "linear", prediction_type or "epsilon"
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {sorted(NOISE_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if shift != 1.0:
        raise ValueError(f"shift={shift} is the resolution shift of objective='flow_matching'; a DDPM schedule "
                         "has none: set shift=1.0 or objective='flow_matching'")
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


def flow_scheduler_config(num_train_timesteps: int = 1000, shift: float = 1.0) -> dict:
    """A complete, explicit config of every flow scheduler in `FLOW_SCHEDULERS` for a flow-matching model.

    It holds all keys of diffusers' `FlowMatchEulerDiscreteScheduler` (static `shift`, no dynamic shifting)
    and the flow mode of the multistep solvers (`use_flow_sigmas`, `flow_shift`, `prediction_type=
    "flow_prediction"`); `make_scheduler` hands each class the keys it takes. `shift` is SD3's resolution
    shift t ← shift·t / (1 + (shift − 1)·t) (Esser et al. 2024, §5.3.2), the same in training and sampling.
    """
    if not shift > 0:
        raise ValueError(f"shift must be positive (1.0 = no shift; SD3 uses 3.0 at 1024²), got {shift}")
    shift = float(shift)
    return dict(
        num_train_timesteps=int(num_train_timesteps),
        shift=shift,
        use_dynamic_shifting=False,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        invert_sigmas=False,
        shift_terminal=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        time_shift_type="exponential",
        stochastic_sampling=False,
        prediction_type=FLOW_PREDICTION,
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
    )


def scheduler_family(config: Mapping) -> str:
    """"flow_matching" for the config of a flow scheduler (a flow-matching class, or a solver in its flow
    mode), else "ddpm"."""
    flow_class = "shift" in config and "beta_start" not in config  # FlowMatch*: a shift and no betas
    return "flow_matching" if flow_class or config.get("prediction_type") == FLOW_PREDICTION else "ddpm"


# DDPM samplers that diffusers refuses for a prediction type (loudly, at their first step): refused here before work.
UNSUPPORTED_PREDICTIONS: dict[str, tuple[str, ...]] = {"euler_a": ("sample",), "kdpm2": ("sample",),
                                                       "pndm": ("sample",)}


def check_scheduler(name: str, family: str, prediction_type: str | None = None) -> None:
    """Raise unless `name` is a sampler of models of `family` (and of `prediction_type`, if given); the message
    names both and the right choices."""
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULER_NAMES}")
    if prediction_type in UNSUPPORTED_PREDICTIONS.get(name, ()):
        usable = sorted(n for n in SCHEDULERS if prediction_type not in UNSUPPORTED_PREDICTIONS.get(n, ()))
        raise ValueError(f"scheduler {name!r} cannot sample a model that predicts {prediction_type!r} (diffusers "
                         f"implements no such step): choose one of {usable}")
    if name not in SCHEDULER_FAMILIES[family]:
        other = next(f for f in OBJECTIVES if f != family)
        raise ValueError(
            f"scheduler {name!r} ({SCHEDULER_FAMILIES[other][name].__name__}) samples {other} models, but this "
            f"model was trained with the {family} objective: choose one of {sorted(SCHEDULER_FAMILIES[family])}")


def make_scheduler(name: str, config: Mapping) -> SchedulerMixin:
    """Build the sampler `name` on the scheduler config of a trained model (`scheduler_config`, or the config
    of any scheduler built from it), in the model's family: a flow model's config is rebuilt with
    `flow_scheduler_config` from its timesteps and shift, so every flow scheduler gets its flow mode."""
    family = scheduler_family(config)
    check_scheduler(name, family, config.get("prediction_type") if family == "ddpm" else None)
    cls = SCHEDULER_FAMILIES[family][name]
    if family == "ddpm":
        return cls.from_config(dict(config))
    shift = config["shift"] if "shift" in config else config.get("flow_shift", 1.0)
    full = flow_scheduler_config(config["num_train_timesteps"], shift)
    keys = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in full.items() if k in keys})


def default_scheduler(config: Mapping) -> SchedulerMixin:
    """The scheduler a pipeline is exported with (`DEFAULT_SCHEDULERS` of the config's family)."""
    return make_scheduler(DEFAULT_SCHEDULERS[scheduler_family(config)], config)
