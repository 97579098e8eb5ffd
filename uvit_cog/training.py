"""The training step's pieces as plain functions: per-sample randomness, the loss, the validation loss, EMA and the
rank-sync check.

Nothing here knows about configs or run directories: `train.py` passes explicit values.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import evenly_spaced, sample_latents
from .schedule import Objective


class GlobalBatchRandom:
    """Random draws for a whole global batch, of which this micro-batch on this rank takes rows
    `offset : offset + local_batch`.

    Seeded by (seed, step) only, so a step's noise, timesteps, flips and label drops depend on neither the
    number of processes, nor gradient accumulation, nor restarts: a resumed, accumulated or multi-process
    run reproduces a single-process uninterrupted one up to floating-point reduction order.
    """

    def __init__(self, seed: int, step: int, offset: int, local_batch: int, global_batch: int,
                 device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(hash((int(seed), int(step))) & (2**63 - 1))
        self.device, self.total, self.rows = device, global_batch, slice(offset, offset + local_batch)

    def rand(self) -> Tensor:
        """(local_batch,) uniform numbers in [0, 1)."""
        return torch.rand(self.total, generator=self.generator, device=self.device)[self.rows]

    def randn(self, *shape: int) -> Tensor:
        """(local_batch, *shape) standard normal numbers."""
        return torch.randn(self.total, *shape, generator=self.generator, device=self.device)[self.rows]

    def timesteps(self, objective: Objective) -> Tensor:
        """(local_batch,) training values of t, drawn as the objective's `sample_t` defines."""
        return objective.sample_t(self.total, self.generator, self.device)[self.rows]


def diffusion_loss(model: nn.Module, objective: Objective, x0: Tensor, class_labels: Tensor | None,
                   rnd: GlobalBatchRandom) -> Tensor:
    """The objective's loss (`Objective.loss`: the MSE of its target, weighted as configured) at t and noise
    drawn from `rnd`; the model is called at the objective's timesteps (t for DDPM, t·T for flow matching)."""
    t = rnd.timesteps(objective)
    noise = rnd.randn(*x0.shape[1:]).to(x0.dtype)
    xt = objective.add_noise(x0, noise, t)
    pred = model(xt, objective.model_timesteps(t), class_labels=class_labels).sample
    return objective.loss(pred, objective.target(x0, noise, t), t)


# ----------------------------------------------------------------------------------------------------------
# Validation loss


def validation_images(dataset: Dataset, num_images: int, seed: int = 0,
                      latent_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """`num_images` evenly spaced items of a held-out dataset as model inputs x0 (N, C, H, W) and labels (N,).

    For a latent dataset (items are VAE moments) give `latent_scale`, the data's scale factor: each latent
    is drawn once, mean + std·ε with ε from a generator seeded `seed`, so the set is fixed.
    """
    if num_images > len(dataset):
        raise ValueError(f"num_images={num_images} but the held-out set has only {len(dataset)} images: "
                         f"validate on at most {len(dataset)} (or hold out more)")
    items = [dataset[i] for i in evenly_spaced(len(dataset), num_images)]
    x0 = torch.stack([x for x, _ in items]).float()
    labels = torch.stack([torch.as_tensor(y) for _, y in items]).long()
    if latent_scale is not None:
        eps = torch.randn(x0.shape[0], x0.shape[1] // 2, *x0.shape[2:], generator=torch.Generator().manual_seed(seed))
        x0 = sample_latents(x0, latent_scale, eps)
    return x0, labels


@torch.no_grad()
def validation_loss(model: nn.Module, objective: Objective, x0: Tensor, class_labels: Tensor | None,
                    num_timesteps: int = 10, seed: int = 0, batch_size: int = 64) -> dict:
    """The denoising loss of `model` on held-out images x0 (N, C, H, W) at a fixed grid of t, with fixed noise.

    Grid: `objective.grid(num_timesteps)`, evenly spaced values of t (DDPM: timesteps (k + ½)·T/K; flow
    matching: t = (k + ½)/K); neither the training t distribution, its shift, nor the loss weighting apply,
    so runs that differ in those still compare. The noise of grid point k is drawn on the CPU from a
    generator seeded (seed, k), the same whatever the batch size, device or step. Returns

        val_loss, val_loss_t          the MSE of the model's own target (ε, v, x0 or the flow velocity):
                                      the mean over the grid and one value per grid point
        val_eps_mse, val_eps_mse_t    the MSE of the ε̂ its prediction implies (`Objective.epsilon`),
                                      comparable across objectives and parametrisations
        val_timesteps, val_log_snr    the timestep the model saw at each grid point, and log SNR there
                                      (objectives space their grids differently: compare curves on log SNR)

    The model is evaluated in eval mode and left in the mode it was in.
    """
    device = next(model.parameters()).device
    grid = objective.grid(num_timesteps)
    was_training = model.training
    model.eval()
    loss_t, eps_t = [], []
    for k, t in enumerate(grid):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(hash((int(seed), k)) & (2**63 - 1)))
        loss_sum = eps_sum = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(x0), batch_size):
            x, n = (a[start : start + batch_size].to(device) for a in (x0, noise))
            labels = None if class_labels is None else class_labels[start : start + batch_size].to(device)
            tt = t.to(device).expand(len(x))
            xt = objective.add_noise(x, n, tt)
            pred = model(xt, objective.model_timesteps(tt), class_labels=labels).sample.float()
            loss_sum = loss_sum + (pred - objective.target(x, n, tt).float()).square().flatten(1).mean(1).sum()
            eps_sum = eps_sum + (objective.epsilon(pred, xt.float(), tt) - n).square().flatten(1).mean(1).sum()
        loss_t.append(loss_sum.item() / len(x0))
        eps_t.append(eps_sum.item() / len(x0))
    model.train(was_training)
    return dict(
        val_loss=float(np.mean(loss_t)), val_eps_mse=float(np.mean(eps_t)), val_loss_t=loss_t, val_eps_mse_t=eps_t,
        val_timesteps=objective.model_timesteps(grid).double().tolist(), val_log_snr=objective.log_snr(grid).tolist(),
    )


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter (same on every rank: params agree)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of optimiser step `step` (1-based): `decay`, or with warm-up min(decay, (1+step)/(10+step)).

    Without warm-up a decay d keeps d^step of the random initial weights (37% after 1,000 steps at
    d = 0.999), which ruins the EMA of short runs; the warm-up is diffusers' `EMAModel` default.
    """
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def model_fingerprint(*modules: nn.Module) -> Tensor:
    """(sum, sum of squares) of each parameter tensor in float64: equal prints mean (almost surely) equal weights."""
    return torch.stack([
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
        for m in modules for p in m.parameters()
    ]).flatten()


def check_ranks_in_sync(accelerator: Accelerator, **modules: nn.Module) -> None:
    """Raise if any rank's weights differ from rank 0's or are not finite (every rank must call this)."""
    for name, module in modules.items():
        prints = accelerator.gather(model_fingerprint(module)[None])
        if not torch.isfinite(prints).all():
            raise RuntimeError(f"{name} weights hold NaN or Inf: refusing to checkpoint them")
        if not torch.equal(prints, prints[:1].expand_as(prints)):
            raise RuntimeError(f"{name} weights differ between processes: the ranks have diverged")
