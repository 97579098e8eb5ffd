"""What bench/gpu.py runs: the GPU plan and its CPU dry run, and the attention shapes of the U-ViT recipes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from uvit_cog import PRESETS, UViTModel
from uvit_cog.attention import kernel_kinds
from uvit_cog.kernels.triton_tuning import block_d

KINDS = tuple(kernel_kinds())  # every kind with a fused row map
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SECTIONS = ("tune", "correctness", "attention", "training")

# The U-ViT recipes whose attention shapes are timed: preset and dataset arguments (conf/experiment/*.yaml).
RECIPES = {
    "CIFAR-10 U-ViT-S/2": dict(preset="uvit-small", sample_size=32, patch_size=2, in_channels=3, num_classes=0),
    "ImageNet-64 U-ViT-M/4": dict(preset="uvit-mid", sample_size=64, patch_size=4, in_channels=3, num_classes=1000),
    "ImageNet-256 U-ViT-H/2": dict(preset="uvit-huge", sample_size=32, patch_size=2, in_channels=4, num_classes=1000),
}
# The paper's own model: U-ViT's MS-COCO text-to-image S/2 (256×256 images as 32×32×4 latents, the time token and
# CLIP's 77 text tokens before the 256 patches: 334 tokens).
RECIPES["MS-COCO U-ViT-S/2 (text-to-image)"] = dict(preset="uvit-small-mscoco")
# The training section's models, in order (U-ViC against U-ViT on each): the paper's model first.
TRAIN_RECIPES = ("MS-COCO U-ViT-S/2 (text-to-image)", "CIFAR-10 U-ViT-S/2")
LONG_SHAPE = ("N = 4097, H = 8, D = 64", (8, 8, 4097, 64))


@dataclass(frozen=True)
class Plan:
    """What one run does and how long each part may take: the GPU suite, or its tiny dry run on the CPU."""

    name: str
    device: str
    jobs: int  # worker processes for untimed work (0: run it inline)
    time_limit_s: float  # the whole run
    budgets_s: dict[str, float]  # per section
    tune_buckets: tuple[tuple[str, str], ...]  # (kind, dtype), each at every tune shape
    tune_shapes: tuple[tuple[str, tuple[int, int, int, int]], ...] | None  # None: one U-ViT shape per BLOCK_D
    max_candidates: int | None  # configs per kernel (None: all that autotuning tries)
    tune_timing: tuple[int, int, int]  # (warm-up calls, rounds, calls per round); the best round counts
    check_dtypes: tuple[str, ...]
    check_lengths: tuple[int, ...]  # N = M, without a mask, at every head dim
    check_head_dims: tuple[int, ...]
    check_masked: tuple[tuple[int, int, int, str], ...]  # (N, M, D, mask)
    check_heads: int
    attn_dtype: str
    attn_batch: int
    attn_shapes: tuple[tuple[str, tuple[int, int, int, int]], ...] | None  # None: the U-ViT ones + LONG_SHAPE
    attn_timing: tuple[int, int, int]  # (warm-up calls, rounds, calls per round); the median round counts
    sdpa: tuple[tuple[str, str], ...]  # (label, SDPBackend member)
    train_models: tuple[tuple[str, dict], ...] | None  # (label, UViTModel arguments); None: TRAIN_RECIPES
    train_batch: int
    train_steps: int
    round_steps: int
    compile_backend: str
    compile_warmup: int
    compile_rounds: int
    compile_reserve_s: float  # start the compiled runs only with this much time left


GPU_PLAN = Plan(
    name="gpu", device="cuda", jobs=max(1, min(14, (os.cpu_count() or 2) - 2)), time_limit_s=450.0,
    budgets_s={"tune": 150.0, "correctness": 75.0, "attention": 45.0, "training": 450.0},  # training: the rest
    tune_buckets=tuple((kind, dtype) for dtype in ("bfloat16", "float16", "float32") for kind in KINDS),
    tune_shapes=None, max_candidates=None, tune_timing=(2, 3, 5),
    check_dtypes=("float32", "float16", "bfloat16"), check_lengths=(257, 1025, 4097), check_head_dims=(64, 72, 128),
    check_masked=((1025, 257, 72, "keys"), (257, 1025, 128, "rows"), (4097, 1025, 64, "rows")), check_heads=2,
    attn_dtype="bfloat16", attn_batch=128, attn_shapes=None, attn_timing=(3, 7, 10),
    sdpa=(("sdpa flash", "FLASH_ATTENTION"), ("sdpa cudnn", "CUDNN_ATTENTION")),
    train_models=None, train_batch=128, train_steps=300, round_steps=50,
    compile_backend="inductor", compile_warmup=3, compile_rounds=3, compile_reserve_s=150.0,
)

DRY_PLAN = Plan(
    name="dry-run", device="cpu", jobs=1, time_limit_s=600.0,
    budgets_s={"tune": 150.0, "correctness": 150.0, "attention": 150.0, "training": 150.0},
    tune_buckets=(("cog", "float32"), ("softmax1", "float16")),
    tune_shapes=(("tiny", (1, 1, 33, 24)),), max_candidates=2, tune_timing=(0, 1, 1),
    check_dtypes=("float32", "float16"), check_lengths=(33,), check_head_dims=(24,),
    check_masked=((33, 17, 16, "keys"), (17, 33, 24, "rows")), check_heads=2,
    attn_dtype="float16", attn_batch=1,
    attn_shapes=(("tiny stand-in for CIFAR-10 U-ViT-S/2", (1, 1, 33, 16)),
                 ("tiny stand-in for N = 4097", (1, 1, 65, 16))),
    attn_timing=(0, 1, 1), sdpa=(("sdpa flash", "MATH"), ("sdpa cudnn", "MATH")),
    train_models=(("tiny text-to-image", dict(sample_size=8, patch_size=2, in_channels=4, embed_dim=32, depth=2,
                                              num_heads=2, text_dim=16, num_text_tokens=5, timestep_offset=1)),
                  ("tiny", dict(sample_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=2, num_heads=2))),
    train_batch=4, train_steps=2, round_steps=1,
    compile_backend="eager", compile_warmup=1, compile_rounds=1, compile_reserve_s=0.0,
)


def recipe_model(label: str) -> dict:
    """The `UViTModel` arguments of recipe `label`: its preset's under its own."""
    args = dict(RECIPES[label])
    return {**PRESETS[args.pop("preset")], **args}


def uvit_attention_shapes(batch: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(recipe, (B, H, N, D)) of the attention in each of `RECIPES`, read off the model built on the meta device
    (N counts the patches and the time token, and the label token of class-conditional models or the text tokens
    of text-to-image ones)."""
    shapes = []
    for label in RECIPES:
        with torch.device("meta"):
            model = UViTModel(**recipe_model(label))
        heads = model.mid_block.attn.num_heads
        shapes.append((label, (batch, heads, model.pos_embed.shape[1], model.config.embed_dim // heads)))
    return shapes


def tune_shapes(plan: Plan) -> tuple[tuple[str, tuple[int, int, int, int]], ...]:
    """The plan's tune shapes, or the first U-ViT attention shape of each head-dim bucket."""
    if plan.tune_shapes:
        return plan.tune_shapes
    by_bucket: dict[int, tuple] = {}
    for label, shape in uvit_attention_shapes(plan.attn_batch):
        by_bucket.setdefault(block_d(shape[-1]), (label, shape))
    return tuple(by_bucket.values())
