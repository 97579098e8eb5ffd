"""Cog attention and its relatives in Triton, flash-attention style: no N×M tensor is ever written to memory.

One set of three kernels serves every row map in `KINDS`; the compile-time switch `KIND` (a
tl.constexpr) picks the map, so each kind compiles to its own specialised code and Cog's is the code
it always was. Forward tiles over keys with a running max `m` and sum `l` and accumulates the
unnormalised weights times v, then stores O and one float32 statistic L per query row (dP = dO vᵀ,
Δ = rowsum(dO∘O) = Σ_j w_j dP_j, all logits in base 2: the score scale carries log2 e):

Forward, per key tile (the running sums rescaled by 2^{m_old − m_new} as m grows; m₀ its start), and L:

    cog       p = 2^{|s| − m}, w = sign(s)·p, l += Σp, m₀ = 0                   L = m + log l
    softmax   p = 2^{s − m}, w = p, l += Σp, m₀ = −∞                             L = m + log l
    softmax1  as softmax with m₀ = c (the sink logit); at the end l += 2^{c − m}  L = m + log l
    softpick  u = 2^{s − m} − 2^{−m}, w = ReLU(u), l += Σ|u|, m₀ = 0;
              at the end l += ε·2^{−m}, so l = e^{−m}(Σ|eˢ − 1| + ε)            L = m + log l
    sigmoid   w = σ(s + b): no running max, no normaliser                      (L unused)

and O = Σ w v / l (sigmoid: Σ w v). Backward recomputes each tile's weights from L:

    cog       p = 2^{|s| − L}, w = sign(s)·p                dS = p∘dP − w∘Δ
    softmax   w = 2^{s − L}                                 dS = w∘(dP − Δ)
    softmax1  w = 2^{s − L}                                 dS = w∘(dP − Δ), dc = −Σ_rows 2^{c − L}·Δ
    softpick  g = 2^{s − L} (= eˢ/Z), w = ReLU(g − 2^{−L})  dS = g∘([s > 0]∘dP − sign(s)∘Δ)
    sigmoid   w = σ(s + b)                                  dS = w∘(1 − w)∘dP

(softpick: with u_j = eˢʲ − 1 and Z = Σ|u| + ε, ∂w_i/∂s_j = δ_ij [u_i > 0] eˢⁱ/Z − w_i sign(u_j) eˢʲ/Z;
softmax1: the sink is one more key of logit c and value 0, so its gradient is softmax's, −w_sink·Δ.)
Then for every kind dV = wᵀ dO, dK = dSᵀ q · scale (one program per key block, looping over queries),
dQ = dS k · scale (one program per query block, looping over keys), so neither kernel needs atomics.
Every statistic is float32. Sequence lengths need not be multiples of the block sizes and the head dim
is padded to a power of two with masked loads. A boolean key mask removes keys from numerators and
normalisers (for cog after the absolute value); rows with no kept key give zeros (cog and softmax:
L = +inf makes their p vanish in backward; softmax1 and softpick: l stays at the sink or ε alone).

On a CUDA device the block sizes are autotuned, except where `tuned_blocks.json` beside this file (written
by `python bench/gpu.py` on a GPU of the same compute capability) names the fastest config of a kernel's
bucket (kind, dtype, head dim padded to BLOCK_D): then that config launches, with no autotuning. Under
`TRITON_INTERPRET=1` (CPU tensors, for tests) one fixed configuration is used because autotuning needs a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from . import row_map_arguments

INTERPRET = knobs.runtime.interpret
AUTOTUNE = torch.cuda.is_available() and not INTERPRET
FIXED_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}  # used without autotuning
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("cog", "softmax", "softmax1", "softpick", "sigmoid")
LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256


@triton.jit
def _tile_ptrs(base, b, h, stride_b, stride_h, stride_l, rows, dims):
    """Pointers to the (rows, dims) tile of head (b, h) of a (B, H, L, D) tensor with unit stride on D."""
    offset = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return base + offset + rows[:, None] * stride_l + dims[None, :]


@triton.jit
def _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK: tl.constexpr):
    """(rows, cols) tile of kept scores: in bounds and, with a mask, not masked out."""
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        offset = b.to(tl.int64) * smb + h.to(tl.int64) * smh
        ptrs = Mask + offset + rows[:, None] * smn + cols[None, :] * smm
        ok = ok & (tl.load(ptrs, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _scores(q, k, keep, qk_scale, PRECISION: tl.constexpr, KIND: tl.constexpr):
    """Scores s (base-2 units) of a q tile against a k tile, and the logits x of the row map (|s| for cog,
    s otherwise) with dropped entries at -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if KIND == "cog":
        x = tl.where(keep, tl.abs(s), float("-inf"))
    else:
        x = tl.where(keep, s, float("-inf"))
    return s, x


@triton.jit
def _sigmoid2(s, keep, bias2):
    """σ(s + b) for base-2 scores and bias (σ(z) = 1 / (1 + 2^{−z·log2 e})), 0 where dropped."""
    return tl.where(keep, 1.0 / (1.0 + tl.exp2(-(s + bias2))), 0.0)


@triton.jit
def _grad_tile(q, k, v, do, lse, delta, keep, qk_scale, bias2, PRECISION: tl.constexpr, KIND: tl.constexpr):
    """Weights w and score gradient dS of one (query, key) tile, recomputed from the row statistic L."""
    s, x = _scores(q, k, keep, qk_scale, PRECISION, KIND)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if KIND == "cog":
        p = tl.exp2(x - lse[:, None])
        w = tl.where(s < 0, -p, p)
        ds = p * dp - w * delta[:, None]
    elif KIND == "sigmoid":
        w = _sigmoid2(s, keep, bias2)
        ds = w * (1.0 - w) * dp
    elif KIND == "softpick":
        g = tl.exp2(x - lse[:, None])
        w = tl.maximum(g - tl.exp2(-lse)[:, None], 0.0)
        ds = g * tl.where(s > 0, dp - delta[:, None], tl.where(s < 0, delta[:, None], 0.0))
    else:  # softmax, softmax1
        w = tl.exp2(x - lse[:, None])
        ds = w * (dp - delta[:, None])
    return w, ds


@triton.jit
def _cog_fwd(
    Q, K, V, Mask, Sink, O, Lse, qk_scale, bias2, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smn, smm, sob, soh, son,
    H, N, M, D,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    q = tl.load(_tile_ptrs(Q, b, h, sqb, sqh, sqn, rows, dims), mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # Cog: |s| >= 0, so 0 is a valid start for the running max; a row with no kept key keeps m = 0, l = 0.
    # Softpick: m >= 0 keeps 2^{−m} <= 1. Softmax1: the sink is a key of logit c. Softmax: m starts at −inf.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if KIND == "softmax":
        m_i = m_i - float("inf")
    if KIND == "softmax1":
        m_i = m_i + tl.load(Sink + h)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(_tile_ptrs(K, b, h, skb, skh, skn, cols, dims), mask=kv_mask, other=0.0)
        v = tl.load(_tile_ptrs(V, b, h, svb, svh, svn, cols, dims), mask=kv_mask, other=0.0)
        keep = _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK)
        s, x = _scores(q, k, keep, qk_scale, PRECISION, KIND)
        if KIND == "sigmoid":  # no normaliser: a plain sum of σ(s + b) v
            acc += tl.dot(_sigmoid2(s, keep, bias2).to(v.dtype), v, input_precision=PRECISION)
        else:
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_use = m_new
            if KIND == "softmax":  # no kept key yet: subtract 0, not −inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(x - m_use[:, None])
            if KIND == "softpick":
                u = tl.where(keep, p - tl.exp2(-m_use)[:, None], 0.0)
                l_i = l_i * alpha + tl.sum(tl.abs(u), 1)
                w = tl.maximum(u, 0.0)
            else:
                l_i = l_i * alpha + tl.sum(p, 1)
                w = p
                if KIND == "cog":
                    w = tl.where(s < 0, -p, p)
            acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    o_ptrs = _tile_ptrs(O, b, h, sob, soh, son, rows, dims)
    if KIND == "sigmoid":
        out = acc
        lse = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        if KIND == "softmax1":
            l_i += tl.exp2(tl.load(Sink + h) - m_i)
        if KIND == "softpick":
            l_i += eps * tl.exp2(-m_i)
        kept = l_i > 0
        l_safe = tl.where(kept, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(kept, m_i + tl.log2(l_safe), float("inf"))
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + bh * N + rows, lse, mask=row_ok)


@triton.jit
def _cog_bwd_dkdv(
    Q, K, V, DO, Mask, Lse, Delta, DK, DV, qk_scale, scale, bias2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, smb, smh, smn, smm,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, N, M, D,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < M
    dim_ok = dims < D
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(_tile_ptrs(K, b, h, skb, skh, skn, cols, dims), mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, svb, svh, svn, cols, dims), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(_tile_ptrs(Q, b, h, sqb, sqh, sqn, rows, dims), mask=q_mask, other=0.0)
        do = tl.load(_tile_ptrs(DO, b, h, sdob, sdoh, sdon, rows, dims), mask=q_mask, other=0.0)
        lse = tl.load(Lse + bh * N + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh * N + rows, mask=row_ok, other=0.0)
        keep = _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK)
        w, ds = _grad_tile(q, k, v, do, lse, delta, keep, qk_scale, bias2, PRECISION, KIND)
        dv += tl.dot(tl.trans(w.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(_tile_ptrs(DK, b, h, sdkb, sdkh, sdkn, cols, dims), (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(DV, b, h, sdvb, sdvh, sdvn, cols, dims), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _cog_bwd_dq(
    Q, K, V, DO, Mask, Lse, Delta, DQ, qk_scale, scale, bias2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, smb, smh, smn, smm, sdqb, sdqh, sdqn,
    H, N, M, D,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(_tile_ptrs(Q, b, h, sqb, sqh, sqn, rows, dims), mask=q_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, sdob, sdoh, sdon, rows, dims), mask=q_mask, other=0.0)
    lse = tl.load(Lse + bh * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(_tile_ptrs(K, b, h, skb, skh, skn, cols, dims), mask=kv_mask, other=0.0)
        v = tl.load(_tile_ptrs(V, b, h, svb, svh, svn, cols, dims), mask=kv_mask, other=0.0)
        keep = _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK)
        _, ds = _grad_tile(q, k, v, do, lse, delta, keep, qk_scale, bias2, PRECISION, KIND)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(_tile_ptrs(DQ, b, h, sdqb, sdqh, sdqn, rows, dims), (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _configs(pairs: list[tuple[int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn in pairs
        for warps, stages in ((4, 2), (8, 3))
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles too big for shared memory: float32 with full-precision dots holds 4-byte tiles."""
    max_tile = 2048 if kwargs["PRECISION"] == "ieee" else 8192
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile]


def _launcher(kernel, pairs: list[tuple[int, int]]):
    """The kernel autotuned over block sizes on a GPU, or the plain kernel with FIXED_BLOCKS otherwise."""
    if AUTOTUNE:
        key = ["N", "M", "BLOCK_D", "HAS_MASK", "PRECISION", "KIND"]
        tuned = triton.autotune(_configs(pairs), key=key, prune_configs_by={"early_config_prune": _prune})
        return tuned(kernel), {}
    return kernel, FIXED_BLOCKS


_Q_PAIRS = [(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)]  # (BLOCK_M, BLOCK_N), query-major kernels
_FWD, _FWD_BLOCKS = _launcher(_cog_fwd, _Q_PAIRS)
_DQ, _DQ_BLOCKS = _launcher(_cog_bwd_dq, _Q_PAIRS)
_KV_PAIRS = [(32, 32), (32, 64), (64, 64), (32, 128), (64, 128)]  # (BLOCK_M, BLOCK_N), the key-major kernel
_DKDV, _DKDV_BLOCKS = _launcher(_cog_bwd_dkdv, _KV_PAIRS)

# Tuned block sizes (module docstring): name -> (plain kernel, autotuned pairs, default launcher, its blocks).
TUNED_BLOCKS_FILE = Path(__file__).with_name("tuned_blocks.json")
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_KERNELS = {
    "fwd": (_cog_fwd, _Q_PAIRS, _FWD, _FWD_BLOCKS),
    "dq": (_cog_bwd_dq, _Q_PAIRS, _DQ, _DQ_BLOCKS),
    "dkdv": (_cog_bwd_dkdv, _KV_PAIRS, _DKDV, _DKDV_BLOCKS),
}
_tuned: dict[str, dict[str, int]] = {}
_tuned_capability: tuple[int, int] | None = None


def tuned_key(kernel: str, kind: str, dtype: torch.dtype, head_dim: int) -> str:
    """The tuning file's key of a kernel ("fwd", "dq", "dkdv") for a kind, dtype and head dim (as its bucket,
    BLOCK_D), e.g. "fwd/cog/bfloat16/128" for D = 72."""
    return f"{kernel}/{kind}/{str(dtype).removeprefix('torch.')}/{_meta(dtype, head_dim, False, kind)['BLOCK_D']}"


def candidate_configs(kernel: str, dtype: torch.dtype) -> list[dict[str, int]]:
    """The configs that autotuning tries for a kernel and dtype (those that fit), as `CONFIG_FIELDS` dicts."""
    configs = _prune(_configs(_KERNELS[kernel][1]), {}, PRECISION=_meta(dtype, 16, False, "cog")["PRECISION"])
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def read_tuned_blocks(path: Path = TUNED_BLOCKS_FILE) -> tuple[dict[str, dict[str, int]], tuple[int, int] | None]:
    """(configs by `tuned_key`, the compute capability they were tuned on) of a tuning file; ({}, None) without one."""
    if not path.exists():
        return {}, None
    try:
        data = json.loads(path.read_text())
        configs = {str(key): {f: int(c[f]) for f in CONFIG_FIELDS} for key, c in data["configs"].items()}
        capability = tuple(int(x) for x in data["capability"]) if data.get("capability") else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a tuning file of bench/gpu.py ({e!r}): rerun `python bench/gpu.py` "
                         "on a GPU to rewrite it, or delete it to autotune") from e
    return configs, capability


def use_tuned_blocks(configs: dict[str, dict[str, int]], capability: tuple[int, int] | None = None) -> None:
    """Launch `configs` (by `tuned_key`) from now on where the GPU has `capability` (None: any); {}: autotune again."""
    global _tuned, _tuned_capability
    _tuned, _tuned_capability = dict(configs), capability


@functools.lru_cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _launch(name: str, q: Tensor, kind: str) -> tuple:
    """The kernel to launch and its block arguments: the tuned config of this bucket, else autotuning's (or FIXED)."""
    kernel, _, default, blocks = _KERNELS[name]
    if not _tuned:  # no tuning file (the shipped one is empty): skip the key's work on every call
        return default, blocks
    config = _tuned.get(tuned_key(name, kind, q.dtype, q.shape[-1]))
    if config is None or (_tuned_capability is not None and _capability(q.device) != _tuned_capability):
        return default, blocks
    return kernel, config


if AUTOTUNE:
    use_tuned_blocks(*read_tuned_blocks())


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _on_device(x: Tensor):
    """Launch kernels on x's GPU, which need not be the current one (nothing to do when interpreted)."""
    return contextlib.nullcontext() if INTERPRET else torch.cuda.device(x.device)


def _mask_args(attn_mask: Tensor | None, q: Tensor, shape: tuple[int, int, int, int]) -> tuple:
    """(mask tensor, its 4 strides over (B, H, N, M)); expanded by strides, never materialised."""
    if attn_mask is None:
        return (q, 0, 0, 0, 0)
    mask = attn_mask.expand(shape).view(torch.uint8)
    return (mask, *mask.stride())


def _meta(dtype: torch.dtype, head_dim: int, has_mask: bool, kind: str) -> dict:
    """Compile-time kernel arguments besides the block sizes."""
    return {
        "HAS_MASK": has_mask,
        "KIND": kind,
        # Full float32 products for float32 inputs (tf32 would miss the 1e-4 tolerance).
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
    }


class AttentionTriton(torch.autograd.Function):
    """Fused attention of one kind: saves q, k, v, O and the float32 row statistic; backward in two kernels."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, kind: str,
                bias: float, eps: float, sink: Tensor) -> Tensor:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        B, H, N, D = q.shape
        M = k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        mask = _mask_args(attn_mask, q, (B, H, N, M))
        meta = _meta(q.dtype, D, attn_mask is not None, kind)
        sink2 = (sink.detach().float() * LOG2E).contiguous()  # the kernels take base-2 logits

        def grid(kw):
            return (triton.cdiv(N, kw["BLOCK_M"]), B * H)

        fwd, blocks = _launch("fwd", q, kind)
        with _on_device(q):
            fwd[grid](
                q, k, v, mask[0], sink2, out, lse, scale * LOG2E, bias * LOG2E, eps,
                *_strides(q), *_strides(k), *_strides(v), *mask[1:], *_strides(out),
                H, N, M, D, **meta, **blocks,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, sink2)
        ctx.scale, ctx.kind, ctx.bias = scale, kind, bias
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, attn_mask, sink2 = ctx.saved_tensors
        do = _unit_last(grad_out)
        B, H, N, D = q.shape
        M = k.shape[2]
        delta = (do.float() * out.float()).sum(dim=-1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        mask = _mask_args(attn_mask, q, (B, H, N, M))
        meta = _meta(q.dtype, D, attn_mask is not None, ctx.kind)
        scale = ctx.scale
        common = (
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *mask[1:],
        )  # fmt: skip

        def grid_kv(kw):
            return (triton.cdiv(M, kw["BLOCK_N"]), B * H)

        def grid_q(kw):
            return (triton.cdiv(N, kw["BLOCK_M"]), B * H)

        qk_scale, bias2 = scale * LOG2E, ctx.bias * LOG2E
        (dkdv, kv_blocks), (dq_kernel, q_blocks) = _launch("dkdv", q, ctx.kind), _launch("dq", q, ctx.kind)
        with _on_device(q):
            dkdv[grid_kv](
                q, k, v, do, mask[0], lse, delta, dk, dv, qk_scale, scale, bias2,
                *common, *_strides(dk), *_strides(dv), H, N, M, D, **meta, **kv_blocks,
            )  # fmt: skip
            dq_kernel[grid_q](
                q, k, v, do, mask[0], lse, delta, dq, qk_scale, scale, bias2,
                *common, *_strides(dq), H, N, M, D, **meta, **q_blocks,
            )  # fmt: skip
        dsink = None
        if ctx.kind == "softmax1" and ctx.needs_input_grad[8]:  # the sink key's weight 2^{c − L}, times −Δ
            dsink = -(torch.exp2(sink2.view(1, H, 1) - lse) * delta).sum(dim=(0, 2))
        return dq, dk, dv, None, None, None, None, None, dsink


def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    kind: str = "cog",
    bias: float | None = None,
    eps: float = 1e-6,
    sink: float | Tensor = 0.0,
) -> Tensor:
    """Fused attention of a kind in `KINDS` on CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

    `bias` is sigmoid's b (default −log M), `eps` softpick's ε, `sink` softmax1's logit c (a float or an
    (H,) tensor, differentiable); see `uvit_cog.attention`.
    """
    if kind not in KINDS:
        raise ValueError(f"attention_triton: unknown kind {kind!r}; choose one of {KINDS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"impl='triton' needs q, k, v of one dtype among {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"impl='triton' needs at least one query and one key, got N={q.shape[2]}, M={k.shape[2]}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"impl='triton' supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"impl='triton' needs v of q's head dim {q.shape[-1]}, got {v.shape[-1]}")
    if not INTERPRET and q.device.type != "cuda":
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got {q.device}; use impl='cpu' on the CPU "
            "(or set TRITON_INTERPRET=1 before importing uvit_cog.kernels.triton_cog to test the kernels)"
        )
    scale, bias, sink = row_map_arguments(q, k, scale, bias, sink)
    return AttentionTriton.apply(q, k, v, attn_mask, scale, kind, bias, float(eps), sink)


def cog_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Fused Cog attention on CUDA tensors (CPU tensors under TRITON_INTERPRET=1); see `uvit_cog.cog_attention`."""
    return attention_triton(q, k, v, attn_mask, scale, kind="cog")
