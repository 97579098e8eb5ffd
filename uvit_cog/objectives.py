"""The training objectives: how t is drawn, the noisy input, the target, the timestep the model sees, the per-sample
loss weights (Min-SNR for ε, v, x0 and flow) and ε̂ for an ε-MSE comparable across objectives.

- "ddpm" (`DDPMObjective`): ε / v / x0 prediction on a variance-preserving DDPM schedule, x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε,
  integer timesteps 0..T−1;
- "flow_matching" (`FlowMatchingObjective`): x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1), velocity target v = ε − x0 (SD3's
  and diffusers' flow schedulers' sign convention); the model sees t·T.

Each objective is built from the scheduler config a trained model is exported with (`uvit_cog.schedule`), so
training and sampling share one noise schedule: `make_objective(scheduler_config(...))`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

from .schedule import (
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    T_SAMPLINGS,
    scheduler_family,
)


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
