"""Block sizes of the Triton kernels: the configs autotuning tries, and the tuned ones of `tuned_blocks.json`.

On a CUDA device the kernels autotune their block sizes, except where `tuned_blocks.json` beside this file
(written by `python bench/gpu.py` on a GPU of the same compute capability) names the fastest config of a kernel's
bucket (kernel, row map, dtype, head dim padded to BLOCK_D): then that config launches, with no autotuning.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton

TUNED_BLOCKS_FILE = Path(__file__).with_name("tuned_blocks.json")
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
KERNEL_NAMES = ("fwd", "dkdv", "dq")  # the tuning file's names of the three kernels
Q_PAIRS = [(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)]  # (BLOCK_M, BLOCK_N) of the query-major kernels
KV_PAIRS = [(32, 32), (32, 64), (64, 64), (32, 128), (64, 128)]  # (BLOCK_M, BLOCK_N) of the key-major kernel
PAIRS = {"fwd": Q_PAIRS, "dq": Q_PAIRS, "dkdv": KV_PAIRS}

_tuned: dict[str, dict[str, int]] = {}
_tuned_capability: tuple[int, int] | None = None


def precision(dtype: torch.dtype) -> str:
    """The dots' input precision: full float32 products for float32 inputs (tf32 would miss the 1e-4 tolerance)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """The head-dim bucket: the head dim padded to a power of two, at least 16 (the kernels' BLOCK_D)."""
    return max(16, triton.next_power_of_2(head_dim))


def configs(pairs: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotuning's candidates: every (BLOCK_M, BLOCK_N) pair with two (warps, stages) settings."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn in pairs
        for warps, stages in ((4, 2), (8, 3))
    ]


def prune(candidates: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles too big for shared memory: float32 with full-precision dots holds 4-byte tiles."""
    max_tile = 2048 if kwargs["PRECISION"] == "ieee" else 8192
    return [c for c in candidates if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile]


def tuned_key(kernel: str, kind: str, dtype: torch.dtype, head_dim: int) -> str:
    """The tuning file's key of a kernel ("fwd", "dq", "dkdv") for a row map, dtype and head dim (as its bucket,
    BLOCK_D), e.g. "fwd/cog/bfloat16/128" for D = 72."""
    return f"{kernel}/{kind}/{str(dtype).removeprefix('torch.')}/{block_d(head_dim)}"


def candidate_configs(kernel: str, dtype: torch.dtype) -> list[dict[str, int]]:
    """The configs that autotuning tries for a kernel and dtype (those that fit), as `CONFIG_FIELDS` dicts."""
    kept = prune(configs(PAIRS[kernel]), {}, PRECISION=precision(dtype))
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]


def read_tuned_blocks(path: Path = TUNED_BLOCKS_FILE) -> tuple[dict[str, dict[str, int]], tuple[int, int] | None]:
    """(configs by `tuned_key`, the compute capability they were tuned on) of a tuning file; ({}, None) without one."""
    if not path.exists():
        return {}, None
    try:
        data = json.loads(path.read_text())
        found = {str(key): {f: int(c[f]) for f in CONFIG_FIELDS} for key, c in data["configs"].items()}
        capability = tuple(int(x) for x in data["capability"]) if data.get("capability") else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a tuning file of bench/gpu.py ({e!r}): rerun `python bench/gpu.py` "
                         "on a GPU to rewrite it, or delete it to autotune") from e
    return found, capability


def use_tuned_blocks(tuned: dict[str, dict[str, int]], capability: tuple[int, int] | None = None) -> None:
    """Launch `tuned` (configs by `tuned_key`) from now on where the GPU has `capability` (None: any); {}: autotune."""
    global _tuned, _tuned_capability
    _tuned, _tuned_capability = dict(tuned), capability


@functools.lru_cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def tuned_config(kernel: str, kind: str, q: torch.Tensor) -> dict[str, int] | None:
    """The tuned config of this bucket on q's GPU, or None (autotune)."""
    if not _tuned:  # no tuning file (the shipped one is empty): skip the key's work on every call
        return None
    config = _tuned.get(tuned_key(kernel, kind, q.dtype, q.shape[-1]))
    if config is None or (_tuned_capability is not None and _capability(q.device) != _tuned_capability):
        return None
    return config
