"""The cost of the validation loss against training, side by side, for a recipe: seconds per validation and
per training step, and their ratio at the recipe's `val.every` (and at train.yaml's default, 5,000).

    python bench/val_cost.py                                   # the quickstart (val.every=500)
    python bench/val_cost.py experiment=compare_cpu_uvit       # a CPU recipe on CIFAR-10 (.npz)
    python bench/val_cost.py experiment=quickstart_fm --rounds 7

Everything is built as train.py builds it from the same Hydra config (model, objective, data, held-out images,
`val.*`). A training step is train.py's: a batch of the training data, label dropout, `diffusion_loss` forward
and backward, gradient clipping when set, AdamW, the EMA update; a validation is one `validation_loss` call on
the EMA. The two alternate in rounds, so that a machine whose load changes affects both alike; each time is the
median over rounds. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from uvit_cog.conditioning import null_class_condition
from uvit_cog.data import build_dataset, build_validation_dataset
from uvit_cog.training import (
    GlobalBatchRandom,
    diffusion_loss,
    prepare_batch,
    update_ema,
    validation_images,
    validation_loss,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EVERY = 5000  # conf/train.yaml's val.every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. experiment=compare_cpu_uvit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per round")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="val_cost_")  # the config check wants a writable run_dir; nothing is written
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[*args.overrides, f"run_dir={scratch}"])
    if cfg.data.kind == "latents":
        raise SystemExit("bench/val_cost.py: latent data needs the VAE pipeline of train.py; use a pixel recipe")
    sys.path.insert(0, str(ROOT))  # train_setup.py: train.py's config checks and builders, so the benchmark
    import train_setup as train  # builds what training builds

    train.validate_config(cfg, num_processes=1)
    every = cfg.val.every or DEFAULT_EVERY

    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    _, objective = train.diffusion_setup(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dataset = build_dataset(data)
    num_classes = cfg.model.num_classes
    kind = "class" if num_classes else "none"
    val_x0, val_condition = validation_images(build_validation_dataset(data), cfg.val.num_images, kind,
                                              seed=cfg.val.seed)
    null = null_class_condition(num_classes, 1) if num_classes else None
    batch = cfg.train.batch_size
    step_index = 0

    def train_step() -> None:
        nonlocal step_index
        order = torch.randint(0, len(dataset), (batch,), generator=torch.Generator().manual_seed(step_index))
        items = [dataset[int(i)] for i in order]
        rnd = GlobalBatchRandom(cfg.seed, step_index, 0, batch, batch, torch.device("cpu"))
        x, condition = prepare_batch({k: torch.stack([item[k] for item in items]) for k in items[0]}, rnd, kind,
                                     hflip=cfg.data.hflip, dropout=cfg.train.condition_dropout, null=null)
        loss = diffusion_loss(model, objective, x, condition, rnd)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, cfg.train.ema_decay)
        step_index += 1

    def validate() -> None:
        validation_loss(ema, objective, val_x0, val_condition, cfg.val.num_timesteps, cfg.val.seed, cfg.val.batch_size)

    for _ in range(3):  # warm-up
        train_step()
    validate()
    step_s, val_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step()
        step_s.append((time.perf_counter() - start) / args.steps)
        start = time.perf_counter()
        validate()
        val_s.append(time.perf_counter() - start)
    step, val = statistics.median(step_s), statistics.median(val_s)
    record = {
        "benchmark": "val_cost", "experiment": cfg.name, "overrides": args.overrides,
        "threads": torch.get_num_threads(),
        "batch": batch, "val_num_images": cfg.val.num_images, "val_num_timesteps": cfg.val.num_timesteps,
        "val_batch_size": cfg.val.batch_size, "rounds": args.rounds, "steps_per_round": args.steps,
        "seconds_per_step": step, "seconds_per_validation": val, "val_every": every,
        "ratio_at_val_every": val / (every * step), "ratio_at_default_every": val / (DEFAULT_EVERY * step),
        "torch": torch.__version__,
    }
    print(f"{cfg.name}: batch {batch}, validation of {cfg.val.num_images} images x {cfg.val.num_timesteps} t "
          f"(median of {args.rounds} rounds)")
    print(f"{'training step':<24}{step * 1000:>10.1f} ms")
    print(f"{'validation':<24}{val * 1000:>10.1f} ms   = {val / step:.1f} training steps")
    print(f"validation / training at val.every={every}: {100 * val / (every * step):.2f}%  (target <= 5%)")
    print(f"validation / training at val.every={DEFAULT_EVERY} (train.yaml default): "
          f"{100 * val / (DEFAULT_EVERY * step):.3f}%")
    print(json.dumps(record))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
