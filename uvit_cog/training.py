"""The training step's pieces as plain functions: per-sample randomness, the loss, EMA and the rank-sync check.

Nothing here knows about configs or run directories: `train.py` passes explicit values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from torch import Tensor, nn

from .schedule import sample_timesteps, training_target


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

    def timesteps(self, num_train_timesteps: int) -> Tensor:
        """(local_batch,) training timesteps, drawn as `uvit_cog.schedule.sample_timesteps` defines."""
        return sample_timesteps(self.total, num_train_timesteps, self.generator, self.device)[self.rows]


def diffusion_loss(model: nn.Module, noise_scheduler: DDPMScheduler, x0: Tensor, class_labels: Tensor | None,
                   rnd: GlobalBatchRandom) -> Tensor:
    """The mean squared error of the model's prediction of the target that the scheduler config defines."""
    t = rnd.timesteps(noise_scheduler.config.num_train_timesteps)
    noise = rnd.randn(*x0.shape[1:]).to(x0.dtype)
    xt = noise_scheduler.add_noise(x0, noise, t)
    target = training_target(noise_scheduler, x0, noise, t)
    pred = model(xt, t, class_labels=class_labels).sample
    return F.mse_loss(pred.float(), target.float())


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
