"""The training objectives, the noise schedules they share with sampling, and the scheduler registry.

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
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
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
from torch import Tensor

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


# ----------------------------------------------------------------------------------------------------------
# Objectives: what the model sees and learns, and the loss weights


def training_target(scheduler: DDPMScheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What a DDPM model learns to predict at `timesteps`, by the scheduler's `prediction_type`."""
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


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    """(B,) values as (B, 1, 1, ...) in the dtype of `like`, to broadcast over its images."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class Objective(ABC):
    """A training objective: how t is drawn, the noisy input, the target, the timestep the model sees, the
    per-sample loss weights and the conversion of a prediction to ε̂ (for an ε-MSE comparable across
    objectives). `t` is the objective's own time: integer timesteps (DDPM) or t ∈ [0, 1) (flow matching).

    `t_sampling`: "uniform", or "logit_normal", SD3's t = sigmoid(n), n ~ N(logit_mean, logit_std²)
    (Esser et al. 2024, §3.1; their best setting is location 0, scale 1).
    `loss_weighting`: "none" (plain MSE of the target) or "min_snr": Min-SNR-γ (Hang et al. 2023), whose
    definition is the x0-MSE weighted by min(SNR, γ); `loss_weights` gives the same weighting expressed in
    the MSE of the objective's own target.
    """

    family: str

    def __init__(self, num_train_timesteps: int, t_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, loss_weighting: str = "none", snr_gamma: float = 5.0) -> None:
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {t_sampling!r}; choose one of {T_SAMPLINGS}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be positive (SD3: 1.0), got {logit_std}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        if not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive (Min-SNR: 5.0), got {snr_gamma}")
        self.num_train_timesteps, self.t_sampling = int(num_train_timesteps), t_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.loss_weighting, self.snr_gamma = loss_weighting, float(snr_gamma)

    def unit_t(self, num: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """(num,) draws in [0, 1) by `t_sampling`."""
        if self.t_sampling == "uniform":
            return torch.rand(num, generator=generator, device=device)
        n = torch.randn(num, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def loss(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """The training loss: the MSE of the target, per sample weighted by `loss_weights` under min_snr."""
        if self.loss_weighting == "none":
            return F.mse_loss(pred.float(), target.float())
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
        return (self.loss_weights(t) * per_sample).mean()

    @abstractmethod
    def sample_t(self, num: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        """(num,) training values of t for a whole global batch, drawn from `generator`."""

    @abstractmethod
    def grid(self, num: int) -> Tensor:
        """`num` fixed, evenly spaced values of t (the validation grid)."""

    @abstractmethod
    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timestep the model is called with at t."""

    def t_of_model_timesteps(self, timesteps: Tensor) -> Tensor:
        """The objective's t at which the model is called with `timesteps` (the inverse of `model_timesteps`)."""
        return timesteps

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t, the noisy input at t."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model learns to predict at t."""

    @abstractmethod
    def log_snr(self, t: Tensor) -> Tensor:
        """log(α_t² / σ_t²) of the noisy input x_t = α_t·x0 + σ_t·ε."""

    @abstractmethod
    def epsilon(self, pred: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """ε̂: the noise implied by the prediction `pred` of the target at (x_t, t)."""

    @abstractmethod
    def loss_weights(self, t: Tensor) -> Tensor:
        """(B,) Min-SNR-γ weights on the MSE of the target."""


class DDPMObjective(Objective):
    """ε / v / x0 prediction on a DDPM schedule: x_t = α·x0 + σ·ε with α = √ᾱ_t, σ = √(1 − ᾱ_t), t integer.

    Min-SNR-γ weights on the MSE of each target (SNR = ᾱ_t / (1 − ᾱ_t); Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy", §3):
    ε: min(SNR, γ)/SNR, since ‖ε̂ − ε‖² = SNR·‖x̂0 − x0‖²;
    v: min(SNR, γ)/(SNR + 1), since ‖v̂ − v‖² = (SNR + 1)·‖x̂0 − x0‖² (the known pitfall: not the ε weight);
    x0: min(SNR, γ).
    """

    family = "ddpm"

    def __init__(self, config: Mapping, **training) -> None:
        super().__init__(config["num_train_timesteps"], **training)
        self.scheduler = DDPMScheduler.from_config(dict(config))
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()

    def sample_t(self, num: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        if self.t_sampling == "uniform":  # the draw of runs made before t_sampling existed
            return sample_timesteps(num, self.num_train_timesteps, generator, device)
        return (self.unit_t(num, generator, device) * self.num_train_timesteps).long()

    def grid(self, num: int) -> Tensor:
        return ((torch.arange(num, dtype=torch.float64) + 0.5) * self.num_train_timesteps / num).long()

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return training_target(self.scheduler, x0, noise, t)

    def _alpha_bar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()]

    def log_snr(self, t: Tensor) -> Tensor:
        a = self._alpha_bar(t)
        return (a / (1 - a)).log()

    def epsilon(self, pred: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        a = _per_image(self._alpha_bar(t), pred)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            return pred
        if self.prediction_type == "v_prediction":  # v = α·ε − σ·x0, x_t = α·x0 + σ·ε
            return alpha * pred + sigma * xt
        return (xt - alpha * pred) / sigma

    def loss_weights(self, t: Tensor) -> Tensor:
        a = self._alpha_bar(t)
        snr = a / (1 - a)
        clipped = snr.clamp(max=self.snr_gamma)
        weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}
        return weight[self.prediction_type].float()


class FlowMatchingObjective(Objective):
    """Flow matching (rectified flow) on the linear interpolant, SD3 / diffusers sign convention:

        x_t = (1 − t)·x0 + t·ε,   target v = dx_t/dt = ε − x0,   t ∈ [0, 1), t = 1 pure noise,

    the model seeing the timestep t·T (T = num_train_timesteps) that diffusers' flow schedulers pass it.
    Training t is drawn by `t_sampling`, then shifted by SD3's resolution shift t ← s·t / (1 + (s − 1)·t)
    (`shift` s, read from the flow scheduler config so that training and sampling shift alike).

    Min-SNR-γ (`loss_weighting="min_snr"`): with α_t = 1 − t, σ_t = t, SNR = (1 − t)²/t² and the identities
    x̂0 − x0 = −t·(v̂ − v) and ε̂ − ε = (1 − t)·(v̂ − v), Hang et al.'s min(SNR, γ)·‖x̂0 − x0‖² is
    min(SNR, γ)·t²·‖v̂ − v‖² = min((1 − t)², γ·t²)·‖v̂ − v‖², the weight `loss_weights` returns. As a weight
    on the ε-MSE, the form in which SD3 (Esser et al. 2024, §2, after Kingma & Gao 2023) compares objectives
    and finds plain rectified flow to be w_t = t/(1 − t) there, it is min(SNR, γ)/SNR: the DDPM ε-prediction
    weight, so Min-SNR weights each noise level alike whatever the parametrisation. Logit-normal t sampling
    is a weighting in the same sense (SD3 §3.1: the density of t multiplies the loss); the two combine.
    """

    family = "flow_matching"

    def __init__(self, config: Mapping, **training) -> None:
        super().__init__(config["num_train_timesteps"], **training)
        self.shift = float(config["shift"] if "shift" in config else config.get("flow_shift", 1.0))

    def sample_t(self, num: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
        u = self.unit_t(num, generator, device)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def grid(self, num: int) -> Tensor:
        return (torch.arange(num, dtype=torch.float64) + 0.5).div(num).float()

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def t_of_model_timesteps(self, timesteps: Tensor) -> Tensor:
        return timesteps.float() / self.num_train_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t = _per_image(t, x0)
        return (1 - t) * x0 + t * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def log_snr(self, t: Tensor) -> Tensor:
        t = t.double()
        return 2 * ((1 - t) / t).log()

    def epsilon(self, pred: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return xt + (1 - _per_image(t, pred)) * pred

    def loss_weights(self, t: Tensor) -> Tensor:
        t = t.float()
        return torch.minimum((1 - t).square(), self.snr_gamma * t.square())


def make_objective(config: Mapping, t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                   loss_weighting: str = "none", snr_gamma: float = 5.0) -> Objective:
    """The objective of a scheduler config (`scheduler_config`) with the training-only settings given."""
    cls = FlowMatchingObjective if scheduler_family(config) == "flow_matching" else DDPMObjective
    return cls(config, t_sampling=t_sampling, logit_mean=logit_mean, logit_std=logit_std,
               loss_weighting=loss_weighting, snr_gamma=snr_gamma)
