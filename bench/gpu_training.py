"""bench/gpu.py's training section: U-ViC against U-ViT, the same model, batch and step, side by side.

For each of `gpu_plan.TRAIN_RECIPES` (the paper's MS-COCO text-to-image S/2 first, then CIFAR-10 S/2): U-ViC
against U-ViT, batch 128, train.py's step (bench/train_throughput.py): 300 steps of each in bf16 autocast and in
fp16 autocast with a GradScaler, the two models interleaved in rounds of 50 steps, counting non-finite losses;
images/s is the median over the rounds after the first. Then images/s with torch.compile (bf16).
"""

from __future__ import annotations

import math
import statistics
import time
import traceback

import torch
from gpu_common import error_text, round_times
from gpu_plan import DTYPES, TRAIN_RECIPES, Plan, recipe_model
from torch import Tensor
from train_throughput import Trainer

from uvit_cog.training import GlobalBatchRandom, diffusion_loss, update_ema


class SuiteTrainer(Trainer):
    """bench/train_throughput.py's trainer (train.py's step) with fp16's GradScaler, the loss kept on the device,
    non-finite losses counted, and torch.compile through a chosen backend."""

    def __init__(self, attention_type: str, model_kwargs: dict, batch: int, device: torch.device,
                 dtype: torch.dtype, compile_backend: str | None) -> None:
        super().__init__(attention_type, model_kwargs, batch, device, dtype, compile_model=False)
        if compile_backend:
            self.forward = torch.compile(self.model, backend=compile_backend)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.losses: list[Tensor] = []

    def step(self) -> None:
        rnd = GlobalBatchRandom(0, self.step_index, 0, self.batch, self.batch, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = diffusion_loss(self.forward, self.objective, self.x0, self.condition, rnd)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, 0.9999)
        self.losses.append(loss.detach().float())
        self.step_index += 1

    def summary(self) -> dict:
        losses = torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)
        head, tail = losses[:10], losses[-10:]
        return {"steps": len(losses), "nonfinite_losses": int((~torch.isfinite(losses)).sum()),
                "first_losses_mean": head.mean().item() if len(head) else None,
                "last_losses_mean": tail.mean().item() if len(tail) else None}


def train_run(plan: Plan, model_kwargs: dict, dtype: str, compile_backend: str | None, deadline: float) -> dict:
    """U-ViT and U-ViC stepping in alternating rounds; images/s per model from the rounds after the first."""
    device = torch.device(plan.device)
    if compile_backend:
        steps, round_steps = plan.compile_warmup + plan.compile_rounds * plan.round_steps, plan.round_steps
    else:
        steps, round_steps = plan.train_steps, plan.round_steps
    trainers = {"U-ViT": SuiteTrainer("softmax", model_kwargs, plan.train_batch, device, DTYPES[dtype],
                                      compile_backend),
                "U-ViC": SuiteTrainer("cog", model_kwargs, plan.train_batch, device, DTYPES[dtype], compile_backend)}
    first = plan.compile_warmup if compile_backend else round_steps
    rounds = [first] + [round_steps] * math.ceil((steps - first) / round_steps)
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    first_round_s: dict[str, float] = {}
    note = None
    for i, n in enumerate(rounds):
        if time.monotonic() > deadline:
            note = f"stopped after {sum(rounds[:i])} of {steps} steps: time limit"
            break
        for name, trainer in trainers.items():
            seconds = min(round_times(trainer.step, plan.device, 0, 1, n)) * n
            if i == 0:
                first_round_s[name] = seconds
            else:
                rates[name].append(n * plan.train_batch / seconds)
    models = {name: {**trainer.summary(), "first_round_s": first_round_s.get(name),
                     "images_per_s": statistics.median(rates[name]) if rates[name] else None}
              for name, trainer in trainers.items()}
    uvit, uvic = models["U-ViT"]["images_per_s"], models["U-ViC"]["images_per_s"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if plan.device == "cuda" else None  # both models together
    del trainers
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return {"dtype": dtype, "compile": compile_backend, "steps": steps, "round_steps": round_steps, "models": models,
            "ratio_uvic_over_uvit": uvic / uvit if uvic and uvit else None, "peak_gib": peak, "note": note}


def training_section(plan: Plan, deadline: float) -> dict:
    models = plan.train_models or tuple((label, recipe_model(label)) for label in TRAIN_RECIPES)
    runs, skipped = [], []
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for label, model_kwargs in models:
        for dtype, compile_backend in (("bfloat16", None), ("float16", None), ("bfloat16", plan.compile_backend)):
            what = f"{label}: {dtype}" + (f" torch.compile({compile_backend})" if compile_backend else " eager")
            reserve = plan.compile_reserve_s if compile_backend else 0.0
            if time.monotonic() > deadline - reserve:
                skipped.append(f"{what}: under {reserve:.0f} s left" if reserve else what)
                continue
            try:
                runs.append({"run": what, **train_run(plan, model_kwargs, dtype, compile_backend, deadline)})
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing here: reported, the next run goes on
                runs.append({"run": what, "error": error_text(e), "traceback": traceback.format_exc()[-3000:]})
            if plan.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
    partial = skipped or any(r.get("note") for r in runs)
    return {"status": "partial" if partial else "ok", "models": dict(models), "batch": plan.train_batch,
            "runs": runs, "skipped": skipped}
