"""Training throughput of U-ViC against U-ViT: the same model, batch and step, side by side, as a ratio.

    python bench/train_throughput.py                    # CPU: a small model on 32x32 (defaults below)
    python bench/train_throughput.py --gpu              # GPU: U-ViT-S/2 on CIFAR-10 shapes, bf16, batch 128

A step is train.py's: `diffusion_loss` forward and backward, AdamW, the EMA update, on random images in
[-1, 1]. The two models alternate in rounds (U-ViT, U-ViC, U-ViT, ...) so that a machine whose load
changes affects both alike; each model's images/s is the median over rounds. Target: U-ViC >= 0.9x U-ViT.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import torch

from uvit_cog import UViTModel
from uvit_cog.objectives import make_objective
from uvit_cog.schedule import scheduler_config
from uvit_cog.training import GlobalBatchRandom, diffusion_loss, update_ema

CPU_MODEL = dict(sample_size=32, patch_size=2, in_channels=3, embed_dim=192, depth=6, num_heads=3)
GPU_MODEL = dict(sample_size=32, patch_size=2, in_channels=3, embed_dim=512, depth=12, num_heads=8)  # U-ViT-S/2


class Trainer:
    """One model with its optimiser and EMA, stepping as train.py does."""

    def __init__(self, attention_type: str, model_kwargs: dict, batch: int, device: torch.device,
                 dtype: torch.dtype | None, compile_model: bool) -> None:
        torch.manual_seed(0)
        self.model = UViTModel(**model_kwargs, attention_type=attention_type).to(device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-4, betas=(0.99, 0.999), weight_decay=0.03)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.objective = make_objective(scheduler_config())
        self.device, self.batch, self.dtype = device, batch, dtype
        shape = (batch, model_kwargs["in_channels"], model_kwargs["sample_size"], model_kwargs["sample_size"])
        self.x0 = torch.rand(shape, device=device) * 2 - 1
        # A text-to-image model's condition: random features in place of CLIP's (the cost is the same).
        text = (batch, model_kwargs.get("num_text_tokens", 77), model_kwargs.get("text_dim", 0))
        self.condition = {"encoder_hidden_states": torch.randn(text, device=device)} if text[2] else {}
        self.step_index = 0

    def step(self) -> None:
        rnd = GlobalBatchRandom(0, self.step_index, 0, self.batch, self.batch, self.device)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with autocast:
            loss = diffusion_loss(self.forward, self.objective, self.x0, self.condition, rnd)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, 0.9999)
        self.step_index += 1

    def images_per_s(self, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return steps * self.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="U-ViT-S/2, bf16, batch 128 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 (CPU), 128 (GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round; default 3 (CPU), 20 (GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 2 (CPU), 10 (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here; run without --gpu for the CPU benchmark")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    model_kwargs = GPU_MODEL if args.gpu else CPU_MODEL
    batch = args.batch or (128 if args.gpu else 16)
    steps = args.steps or (20 if args.gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if args.gpu else 2)
    dtype = torch.bfloat16 if args.gpu else None

    trainers = {kind: Trainer(kind, model_kwargs, batch, device, dtype, args.compile) for kind in ("softmax", "cog")}
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.step()
    rates = {kind: [] for kind in trainers}
    for _ in range(args.rounds):
        for kind, trainer in trainers.items():
            rates[kind].append(trainer.images_per_s(steps))
    uvit, uvic = statistics.median(rates["softmax"]), statistics.median(rates["cog"])
    record = {
        "benchmark": "train_throughput", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "threads": torch.get_num_threads(), "model": model_kwargs, "batch": batch, "dtype": str(dtype),
        "compile": args.compile, "steps_per_round": steps, "rounds": args.rounds,
        "uvit_images_per_s": uvit, "uvic_images_per_s": uvic, "ratio_uvic_over_uvit": uvic / uvit,
        "torch": torch.__version__,
    }
    print(f"{'model':<8}{'images/s':>12}   (median of {args.rounds} rounds of {steps} steps, batch {batch})")
    print(f"{'U-ViT':<8}{uvit:>12.1f}\n{'U-ViC':<8}{uvic:>12.1f}\nU-ViC / U-ViT = {uvic / uvit:.3f} (target >= 0.9)")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
