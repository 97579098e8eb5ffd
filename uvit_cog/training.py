"""The training step as plain functions: per-sample randomness, batch preparation (flips, the latent draw, the
condition and its dropout), the loss, one optimiser step (backward, clipping, skipping non-finite steps, EMA), the
validation loss and the rank-sync check.

Nothing here knows about configs or run directories: `train.py` passes explicit values, and a notebook can train
with the same step:

    rnd = GlobalBatchRandom(seed, step, 0, batch_size, batch_size, device)
    x, condition = prepare_batch(batch, rnd, "class", dropout=0.1, null=null_class_condition(10, 1))
    result = train_step(accelerator, model, optimizer, lr_scheduler, ema, objective, lambda m: (x, condition, rnd))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import Dataset

from .conditioning import Condition, condition_field, drop_condition
from .data import caption_source, evenly_spaced, is_captioned, sample_latents
from .objectives import Objective

TextEncode = Callable[[list[str]], Tensor]  # captions -> features (N, L, C), e.g. uvit_cog.text.encode_prompts


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


def batch_condition(batch: Mapping[str, Any], kind: str, encode_text: TextEncode | None = None) -> Condition:
    """The condition field (`uvit_cog.conditioning.FIELDS`) a model of condition `kind` takes, from a batch of items:
    its class labels, its text features, or its captions encoded by `encode_text`; nothing when unconditional
    (labels of labelled data are then ignored)."""
    field = condition_field(kind)
    if field is None:
        return {}
    if field in batch:
        return {field: batch[field]}
    if kind == "text" and "caption" in batch and encode_text is not None:
        return {field: encode_text(list(batch["caption"]))}
    raise ValueError(f"a {kind}-conditional model needs items with {field!r}" + (
        ": captioned data (a caption per item, with a text encoder) or extracted text features" if kind == "text"
        else ": labelled data"))


def prepare_batch(
    batch: Mapping[str, Any], rnd: GlobalBatchRandom, condition_kind: str, *, hflip: bool = False,
    latent_scale: float | None = None, dropout: float = 0.0, null: Condition | None = None,
    encode_text: TextEncode | None = None,
) -> tuple[Tensor, Condition]:
    """A batch of dataset items (on the device) as the model's input x0 and condition, with the step's draws from
    `rnd`, in this order: horizontal flips (`hflip`), the latent drawn from stored VAE moments (`latent_scale`,
    the data's scale factor), and condition dropout: each row's condition replaced by `null` (the null label,
    the empty prompt's features) with probability `dropout`, for classifier-free guidance."""
    x = batch["x"]
    if hflip:
        x = torch.where(rnd.rand()[:, None, None, None] < 0.5, x.flip(-1), x)
    if latent_scale is not None:
        x = sample_latents(x, latent_scale, rnd.randn(x.shape[1] // 2, *x.shape[2:]))
    condition = batch_condition(batch, condition_kind, encode_text)
    if condition:  # drawn whatever `dropout` is, so the draws that follow do not depend on it
        drop = rnd.rand() < dropout
        if dropout > 0:
            if null is None:
                raise ValueError("condition dropout needs the null condition")
            condition = drop_condition(condition, drop, null)
    return x, condition


def diffusion_loss(model: nn.Module, objective: Objective, x0: Tensor, condition: Condition,
                   rnd: GlobalBatchRandom) -> Tensor:
    """The objective's loss (`Objective.loss`: the MSE of its target, weighted as configured) at t and noise
    drawn from `rnd`; the model is called at the objective's timesteps (t for DDPM, t·T for flow matching) with
    the condition's fields."""
    t = rnd.timesteps(objective)
    noise = rnd.randn(*x0.shape[1:]).to(x0.dtype)
    xt = objective.add_noise(x0, noise, t)
    pred = model(xt, objective.model_timesteps(t), **condition).sample
    return objective.loss(pred, objective.target(x0, noise, t), t)


@dataclass
class StepResult:
    """One optimiser step: its loss (mean over micro-batches, this rank), the gradient norm before clipping, the
    learning rate it used, and whether it changed the weights (False: skipped as non-finite)."""

    loss: Tensor
    grad_norm: Tensor
    lr: float
    stepped: bool


def train_step(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
    ema: nn.Module | None, objective: Objective,
    micro_batch: Callable[[int], tuple[Tensor, Condition, GlobalBatchRandom]], *, step: int, grad_accum: int = 1,
    max_grad_norm: float | None = None, ema_decay: float = 0.9999, ema_warmup: bool = True, nonfinite: str = "skip",
) -> StepResult:
    """One optimiser step `step + 1`: `grad_accum` micro-batches (`micro_batch(i)` gives x0, its condition and
    the draws), backward (gradients synchronised on the last only), clipping to `max_grad_norm`, the optimiser,
    the LR schedule and the EMA.

    A non-finite loss (any rank's) or gradient norm (already reduced over ranks) never reaches the weights or
    the EMA: the step is skipped, or with `nonfinite="stop"` a FloatingPointError is raised. Under fp16 the loss
    scaler's own overflow skips are counted the same way: optimizer.step() is still called then, so that the
    scaler lowers its scale and training recovers.
    """
    model.train()
    loss_step = torch.zeros((), device=accelerator.device)
    for micro in range(grad_accum):
        x, condition, rnd = micro_batch(micro)
        with contextlib.nullcontext() if micro == grad_accum - 1 else accelerator.no_sync(model):
            loss = diffusion_loss(model, objective, x, condition, rnd)
            accelerator.backward(loss / grad_accum)
        loss_step += loss.detach() / grad_accum
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    loss_bad = accelerator.reduce((~torch.isfinite(loss_step)).float(), "sum") > 0
    lr = lr_scheduler.get_last_lr()[0]  # the rate of this step
    if loss_bad or (not torch.isfinite(norm) and accelerator.scaler is None):
        if nonfinite == "stop":
            raise FloatingPointError(
                f"step {step + 1}: non-finite {'loss' if loss_bad else 'gradient norm'}; the weights are "
                "those of the last good step. Lower optim.lr, set train.max_grad_norm, or use "
                "train.nonfinite=skip to skip such steps")
        stepped = False
    else:
        optimizer.step()
        stepped = not accelerator.optimizer_step_was_skipped
    optimizer.zero_grad(set_to_none=True)
    if stepped:
        lr_scheduler.step()
        if ema is not None:
            update_ema(ema, accelerator.unwrap_model(model), ema_decay_at(step + 1, ema_decay, ema_warmup))
    return StepResult(loss=loss_step, grad_norm=norm, lr=lr, stepped=stepped)


# ----------------------------------------------------------------------------------------------------------
# Validation loss


def validation_images(dataset: Dataset, num_images: int, condition_kind: str, seed: int = 0,
                      latent_scale: float | None = None, encode_text: TextEncode | None = None,
                      ) -> tuple[Tensor, Condition]:
    """`num_images` evenly spaced items of a held-out dataset as model inputs x0 (N, C, H, W) and their fixed
    condition (`batch_condition`): labels, or the first caption of each image (its features, or `encode_text`
    of its text).

    For a latent dataset (items are VAE moments) give `latent_scale`, the data's scale factor: each latent
    is drawn once, mean + std·ε with ε from a generator seeded `seed`, so the set is fixed.
    """
    if num_images > len(dataset):
        raise ValueError(f"num_images={num_images} but the held-out set has only {len(dataset)} images: "
                         f"validate on at most {len(dataset)} (or hold out more)")
    indices = evenly_spaced(len(dataset), num_images)
    if condition_kind == "text" and is_captioned(dataset):
        items = [source.caption_item(j, 0) for source, j in (caption_source(dataset, i) for i in indices)]
    else:
        items = [dataset[i] for i in indices]
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch = {key: torch.stack(values) if isinstance(values[0], Tensor) else values for key, values in batch.items()}
    x0 = batch["x"].float()
    if latent_scale is not None:
        eps = torch.randn(x0.shape[0], x0.shape[1] // 2, *x0.shape[2:], generator=torch.Generator().manual_seed(seed))
        x0 = sample_latents(x0, latent_scale, eps)
    return x0, batch_condition(batch, condition_kind, encode_text)


@torch.no_grad()
def validation_loss(model: nn.Module, objective: Objective, x0: Tensor, condition: Condition,
                    num_timesteps: int = 10, seed: int = 0, batch_size: int = 64) -> dict:
    """The denoising loss of `model` on held-out images x0 (N, C, H, W) with their `condition` (fields of N rows,
    or none) at a fixed grid of t, with fixed noise.

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
            rows = {name: value[start : start + batch_size].to(device) for name, value in condition.items()}
            tt = t.to(device).expand(len(x))
            xt = objective.add_noise(x, n, tt)
            pred = model(xt, objective.model_timesteps(tt), **rows).sample.float()
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
