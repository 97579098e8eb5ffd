"""Attention in Triton for any row map, flash-attention style: no N×M tensor is ever written to memory.

Three kernels tile every row map (`uvit_cog.kernels.TritonRowMap`, the built-in ones in triton_rows.py): the
row map's jit functions are compile-time arguments (tl.constexpr), so each row map compiles to its own
specialised code, and `KIND` (its name) keys the compile and autotuning caches. Forward tiles over keys with a
running maximum m and normaliser l per query row, accumulates the row map's weights times v, then stores
O = Σ w v / l and one float32 statistic L per query row. Backward recomputes each tile's weights from L:
dV = wᵀ dO and dK = dSᵀ q · scale (one program per key block, looping over queries), dQ = dS k · scale (one
program per query block, looping over keys), so neither kernel needs atomics. All logits are in base 2 (the
score scale carries log2 e). Every statistic is float32. Sequence lengths need not be multiples of the block
sizes and the head dim is padded to a power of two with masked loads. A boolean key mask removes keys from
numerators and normalisers.

Block sizes: autotuned on a CUDA device, or the tuned config of `tuned_blocks.json` (triton_tuning.py). Under
`TRITON_INTERPRET=1` (CPU tensors, for tests) one fixed configuration is used because autotuning needs a GPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs

from . import RowMap, row_map_arguments
from .triton_tuning import PAIRS, block_d, configs, precision, prune, read_tuned_blocks, tuned_config, use_tuned_blocks

INTERPRET = knobs.runtime.interpret
AUTOTUNE = torch.cuda.is_available() and not INTERPRET
FIXED_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}  # used without autotuning
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
def _head(H):
    """(b·H + h, b, h): the batch entry b and head h of this program (grid axis 1)."""
    bh = tl.program_id(1)
    return bh, bh // H, bh % H


@triton.jit
def _load_rows(Q, DO, Lse, Delta, b, h, bh, sqb, sqh, sqn, sdob, sdoh, sdon, rows, dims, N, D):
    """A query tile's q, dO, L and Δ (rows past N: L = +inf, so their weights vanish), and its in-bounds mask."""
    row_ok = rows < N
    q_mask = row_ok[:, None] & (dims < D)[None, :]
    q = tl.load(_tile_ptrs(Q, b, h, sqb, sqh, sqn, rows, dims), mask=q_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, sdob, sdoh, sdon, rows, dims), mask=q_mask, other=0.0)
    lse = tl.load(Lse + bh * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh * N + rows, mask=row_ok, other=0.0)
    return q, do, lse, delta, row_ok, q_mask


@triton.jit
def _load_keys(K, V, b, h, skb, skh, skn, svb, svh, svn, cols, dims, M, D):
    """A key tile's k and v, and its in-bounds mask."""
    col_ok = cols < M
    kv_mask = col_ok[:, None] & (dims < D)[None, :]
    k = tl.load(_tile_ptrs(K, b, h, skb, skh, skn, cols, dims), mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, svb, svh, svn, cols, dims), mask=kv_mask, other=0.0)
    return k, v, col_ok, kv_mask


@triton.jit
def _tile_gradient(q, k, v, do, lse, delta, keep, qk_scale, bias2, PRECISION: tl.constexpr, GRADIENT: tl.constexpr):
    """Weights w and score gradient dS of one (query, key) tile, recomputed by the row map from the statistic L."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return GRADIENT(s, keep, dp, lse, delta, bias2)


@triton.jit
def _tiled_fwd(
    Q, K, V, Mask, Sink, O, Lse, qk_scale, bias2, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smn, smm, sob, soh, son,
    H, N, M, D,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, KIND: tl.constexpr,
    START: tl.constexpr, TILE: tl.constexpr, FINISH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h = _head(H)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    q = tl.load(_tile_ptrs(Q, b, h, sqb, sqh, sqn, rows, dims), mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
    c = tl.load(Sink + h)  # the head's sink logit, for the row maps that read it
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + START(c)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v, col_ok, _ = _load_keys(K, V, b, h, skb, skh, skn, svb, svh, svn, cols, dims, M, D)
        keep = _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        w, row_sum, m_i, alpha = TILE(s, keep, m_i, bias2)
        l_i = l_i * alpha + row_sum
        acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
    o_ptrs = _tile_ptrs(O, b, h, sob, soh, son, rows, dims)
    norm, lse = FINISH(l_i, m_i, c, eps)
    out = acc / norm[:, None]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dims < D)[None, :])
    tl.store(Lse + bh * N + rows, lse, mask=row_ok)


@triton.jit
def _tiled_bwd_dkdv(
    Q, K, V, DO, Mask, Lse, Delta, DK, DV, qk_scale, scale, bias2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, smb, smh, smn, smm,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, N, M, D,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, KIND: tl.constexpr, GRADIENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h = _head(H)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k, v, col_ok, kv_mask = _load_keys(K, V, b, h, skb, skh, skn, svb, svh, svn, cols, dims, M, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q, do, lse, delta, row_ok, _ = _load_rows(Q, DO, Lse, Delta, b, h, bh, sqb, sqh, sqn, sdob, sdoh, sdon,
                                                  rows, dims, N, D)
        keep = _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK)
        w, ds = _tile_gradient(q, k, v, do, lse, delta, keep, qk_scale, bias2, PRECISION, GRADIENT)
        dv += tl.dot(tl.trans(w.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(_tile_ptrs(DK, b, h, sdkb, sdkh, sdkn, cols, dims), (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(DV, b, h, sdvb, sdvh, sdvn, cols, dims), dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _tiled_bwd_dq(
    Q, K, V, DO, Mask, Lse, Delta, DQ, qk_scale, scale, bias2,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, smb, smh, smn, smm, sdqb, sdqh, sdqn,
    H, N, M, D,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, KIND: tl.constexpr, GRADIENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h = _head(H)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q, do, lse, delta, row_ok, q_mask = _load_rows(Q, DO, Lse, Delta, b, h, bh, sqb, sqh, sqn, sdob, sdoh, sdon,
                                                   rows, dims, N, D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v, col_ok, _ = _load_keys(K, V, b, h, skb, skh, skn, svb, svh, svn, cols, dims, M, D)
        keep = _keep(Mask, b, h, smb, smh, smn, smm, rows, cols, row_ok, col_ok, HAS_MASK)
        _, ds = _tile_gradient(q, k, v, do, lse, delta, keep, qk_scale, bias2, PRECISION, GRADIENT)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(_tile_ptrs(DQ, b, h, sdqb, sdqh, sdqn, rows, dims), (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launcher(kernel, name: str):
    """The kernel autotuned over block sizes on a GPU, or the plain kernel with FIXED_BLOCKS otherwise."""
    if AUTOTUNE:
        key = ["N", "M", "BLOCK_D", "HAS_MASK", "PRECISION", "KIND"]
        tuned = triton.autotune(configs(PAIRS[name]), key=key, prune_configs_by={"early_config_prune": prune})
        return tuned(kernel), {}
    return kernel, FIXED_BLOCKS


# name (as the tuning file calls it) -> (plain kernel, default launcher, its block arguments)
KERNELS = {name: (kernel, *_launcher(kernel, name))
           for name, kernel in (("fwd", _tiled_fwd), ("dkdv", _tiled_bwd_dkdv), ("dq", _tiled_bwd_dq))}

if AUTOTUNE:
    use_tuned_blocks(*read_tuned_blocks())


def _launch(name: str, q: Tensor, kind: str) -> tuple:
    """The kernel to launch and its block arguments: the tuned config of this bucket, else autotuning's (or FIXED)."""
    kernel, default, blocks = KERNELS[name]
    config = tuned_config(name, kind, q)
    return (default, blocks) if config is None else (kernel, config)


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
    """Compile-time kernel arguments besides the block sizes and the row map's functions."""
    return {"HAS_MASK": has_mask, "KIND": kind, "PRECISION": precision(dtype), "BLOCK_D": block_d(head_dim)}


class AttentionTriton(torch.autograd.Function):
    """Fused attention of one row map: saves q, k, v, O and the float32 row statistic; backward in two kernels."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, row_map: RowMap,
                bias: float, eps: float, sink: Tensor) -> Tensor:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        B, H, N, D = q.shape
        M = k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        mask = _mask_args(attn_mask, q, (B, H, N, M))
        meta = _meta(q.dtype, D, attn_mask is not None, row_map.name)
        rows = row_map.triton_row_map()
        sink2 = (sink.detach().float() * LOG2E).contiguous()  # the kernels take base-2 logits

        def grid(kw):
            return (triton.cdiv(N, kw["BLOCK_M"]), B * H)

        fwd, blocks = _launch("fwd", q, row_map.name)
        with _on_device(q):
            fwd[grid](
                q, k, v, mask[0], sink2, out, lse, scale * LOG2E, bias * LOG2E, eps,
                *_strides(q), *_strides(k), *_strides(v), *mask[1:], *_strides(out),
                H, N, M, D, **meta, START=rows.start, TILE=rows.tile, FINISH=rows.finish, **blocks,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, sink2)
        ctx.scale, ctx.row_map, ctx.bias = scale, row_map, bias
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
        name, rows = ctx.row_map.name, ctx.row_map.triton_row_map()
        meta = {**_meta(q.dtype, D, attn_mask is not None, name), "GRADIENT": rows.gradient}
        scale = ctx.scale
        common = (
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *mask[1:],
        )  # fmt: skip

        def grid_kv(kw):
            return (triton.cdiv(M, kw["BLOCK_N"]), B * H)

        def grid_q(kw):
            return (triton.cdiv(N, kw["BLOCK_M"]), B * H)

        qk_scale, bias2 = scale * LOG2E, ctx.bias * LOG2E
        (dkdv, kv_blocks), (dq_kernel, q_blocks) = _launch("dkdv", q, name), _launch("dq", q, name)
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
        if rows.sink_gradient is not None and ctx.needs_input_grad[8]:
            dsink = rows.sink_gradient(sink2, lse, delta)
        return dq, dk, dv, None, None, None, None, None, dsink


# Inductor writes the compile-time arguments of a user-defined Triton kernel into the code it generates, and a row
# map's jit functions have no such form: torch.compile calls these kernels as they are (a graph break).
@torch.compiler.disable
def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    *,
    row_map: RowMap,
    bias: float | None = None,
    eps: float = 1e-6,
    sink: float | Tensor = 0.0,
) -> Tensor:
    """Attention of `row_map` on CUDA tensors (CPU tensors under TRITON_INTERPRET=1); see `attention_cpu` for the
    parameters and `uvit_cog.attention` for the conventions."""
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
            "(or set TRITON_INTERPRET=1 before importing uvit_cog.kernels.triton_tiling to test the kernels)"
        )
    scale, bias, sink = row_map_arguments(q, k, scale, bias, sink)
    return AttentionTriton.apply(q, k, v, attn_mask, scale, row_map, bias, float(eps), sink)
