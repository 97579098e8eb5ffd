"""diffusers transformers with their own attention processors against the same models after `set_attention`.

    python bench/processors.py                # CPU float32 (and GPU bfloat16 autocast when CUDA is available)
    python bench/processors.py --reps 20 --side 64 --threads 1

For each covered model (DiT, PixArt-α, SD3's MMDiT, Flux), built at a small but not trivial size from the
builders of tests/test_processors.py, one training step's forward+backward is timed with: the model's own
processors; `set_attention(model, "softmax", "all")` (the same SDPA call, routed: the cost of the routing
itself); `set_attention(model, "cog", "all")` (Cog in every layer, the fused CPU path or the Triton kernel).
Times are medians over repetitions interleaved across the three; ratios are to the model's own processors.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from uvit_cog import set_attention

# The covered models and their inputs are defined once, by the tests that check them.
_TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_processors.py"
_spec = importlib.util.spec_from_file_location("test_processors", _TESTS)
covered = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(covered)

VARIANTS = {"own": None, "softmax (routed)": "softmax", "cog": "cog"}


def step(model: torch.nn.Module, inputs: dict, autocast: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = covered.run(model, inputs)
    out.float().square().mean().backward()


def time_variants(name: str, size: dict, device: str, reps: int) -> tuple[dict[str, float], int]:
    """Median seconds of forward+backward per variant (repetitions interleaved), and the parameter count."""
    torch.manual_seed(0)
    model, inputs = covered.COVERED[name](**size)
    model.to(device).train()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "joint_attention_kwargs" in inputs:
        inputs["joint_attention_kwargs"] = {k: v.to(device) for k, v in inputs["joint_attention_kwargs"].items()}
    autocast = device == "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for rep in range(reps + 1):  # round 0 warms up
        for variant, kind in VARIANTS.items():
            set_attention(model, kind or "softmax", "all" if kind else "none")
            sync()
            start = time.perf_counter()
            step(model, inputs, autocast)
            sync()
            if rep:
                times[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(t) for variant, t in times.items()}, sum(p.numel() for p in model.parameters())


def bench(device: str, heads: int, head_dim: int, depth: int, side: int, reps: int) -> None:
    print(f"\n{device}, batch {covered.B}, {heads} heads x {head_dim}, forward+backward"
          + (" (bfloat16 autocast)" if device == "cuda" else f" (float32, {torch.get_num_threads()} threads)"))
    print("| model | params | layers | image tokens | own processors | softmax, routed | cog |")
    print("|---|---|---|---|---|---|---|")
    for name in covered.COVERED:
        # Flux patchifies outside the model: its image side is in tokens, the others' in pixels (patch 2).
        size = dict(heads=heads, head_dim=head_dim, depth=depth, side=side // 2 if name == "flux" else side)
        times, params = time_variants(name, size, device, reps)
        cells = [f"{times['own'] * 1e3:.1f} ms"]
        cells += [f"{times[v] * 1e3:.1f} ms ({times[v] / times['own']:.2f}x)" for v in VARIANTS if v != "own"]
        row = [name, f"{params / 1e6:.2f} M", str(depth), str((side // 2) ** 2), *cells]
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--side", type=int, default=32, help="image side in pixels (patch 2: side²/4 tokens)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench("cpu", args.heads, args.head_dim, args.depth, args.side, args.reps)
    if torch.cuda.is_available():
        bench("cuda", 8, 64, 2 * args.depth, 2 * args.side, args.reps)


if __name__ == "__main__":
    main()
