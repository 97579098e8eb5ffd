"""Fused attention kernels of every kind against the reference: Triton under the interpreter, the blocked CPU path.

The Triton kernels run on CPU tensors through `TRITON_INTERPRET=1`. Triton reads that variable when
it and the kernels are first imported, so those checks run once, all together, in a child process
that imports this module with the variable set; each case is then asserted here on its own.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import uvit_cog.attention.dispatch as dispatch
import uvit_cog.kernels.cpu as cpu_kernels
from uvit_cog import Attention, cog_attention
from uvit_cog.attention import get_attention_kind, kernel_kinds, reference_attention
from uvit_cog.kernels import triton_tiling, triton_tuning
from uvit_cog.kernels.cpu import attention_cpu
from uvit_cog.kernels.tolerances import kernel_error

KINDS = tuple(kernel_kinds())  # every kind with a fused row map, as registered


def make_inputs(N, M, D, dtype, mask_kind=None, H=2, magnitude=1.0, seed=0):
    """q as a strided (B, N, H, D) view like Attention's, k and v contiguous, plus an optional bool mask."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, N, H, D, generator=g) * magnitude).to(dtype).transpose(1, 2)
    k = (torch.randn(1, H, M, D, generator=g) * magnitude).to(dtype)
    v = torch.randn(1, H, M, D, generator=g).to(dtype)
    mask = None
    if mask_kind == "keys":  # key padding, broadcast over heads and queries
        mask = torch.arange(M).view(1, 1, 1, M) < max(1, M - M // 3)
    elif mask_kind == "rows":  # per head and query, with one row that keeps no key
        mask = torch.rand(1, H, N, M, generator=g) > 0.5
        mask[0, 0, N // 2] = False
    grad = torch.randn(1, H, N, D, generator=g).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)], mask, grad


def error(got, want, dtype, what, floor=1e-2):
    """[what, max error, allowed error] (`uvit_cog.kernels.tolerances`), or a failure string if got is not finite."""
    found = kernel_error(got, want, dtype, floor)
    return f"{what}: non-finite values" if found is None else [what, *found]


def assert_matches(checks):
    for check in checks:
        assert not isinstance(check, str), check
        what, err, bound = check
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def compare_to_reference(fn, N, M, D, dtype, mask_kind, magnitude=1.0, floor=1e-2, kind="cog", learned_sink=False):
    """Errors of fn's output and dq, dk, dv (and d sink) against the reference, and whether the empty row is zero."""
    (q, k, v), mask, grad = make_inputs(N, M, D, dtype, mask_kind, magnitude=magnitude)
    params = {"sink": torch.tensor([0.7, -1.5], requires_grad=True)} if learned_sink else {}  # a sink per head
    inputs = (q, k, v, *params.values())
    out = fn(q, k, v, mask, row_map=get_attention_kind(kind).row_map, **params)
    label = f"{kind} N={N} M={M} D={D} {dtype} mask={mask_kind} magnitude={magnitude} sink={learned_sink}"
    if out.dtype != dtype or out.shape != (1, 2, N, D):
        return [f"{label}: output {out.dtype} {tuple(out.shape)}"]
    got = (out, *torch.autograd.grad(out, inputs, grad))
    ref = reference_attention(kind, q, k, v, mask, **params)
    want = (ref, *torch.autograd.grad(ref, inputs, grad))
    names = ("out", "dq", "dk", "dv", "dsink")[: len(got)]
    checks = [error(a, b, dtype, f"{name} {label}", floor) for name, a, b in zip(names, got, want, strict=True)]
    if mask_kind == "rows" and not (torch.all(out[0, 0, N // 2] == 0) and torch.all(got[1][0, 0, N // 2] == 0)):
        checks.append(f"{label}: the row with no kept key is not zero")
    return checks


CASES = [  # (N, M, D, dtype, mask): every N, M != N, every D, both masks, both dtypes, without a full product
    (1, 1, 32, torch.float32, None),
    (17, 17, 64, torch.float32, "rows"),
    (65, 40, 72, torch.float32, "keys"),
    (257, 130, 32, torch.float32, "rows"),
    (1, 17, 72, torch.float16, "keys"),
    (17, 65, 32, torch.float16, None),
    (65, 65, 64, torch.float16, "rows"),
    (257, 257, 72, torch.float16, None),
]


# q, k entries ~ 60 make |s| up to about 1e4 and the weights one-hot: dq and dk of the reference are
# then ~0 and both sides carry rounding of dO·v − Δ, so errors are measured against 1 (the scale of
# out and dv) rather than against max |dq|.
LARGE = (33, 20, 32, torch.float32, "rows", 60.0, 1.0)
# The other kinds share the tiling, so fewer shapes cover them: M != N, D padded, both masks, both dtypes.
KIND_CASES = [
    (17, 40, 32, torch.float32, "rows"),
    (65, 33, 72, torch.float32, "keys"),
    (33, 17, 64, torch.float16, "rows"),
    (40, 65, 32, torch.float16, None),
]
TRITON_CASES = [("cog", *case, 1.0) for case in CASES] + [("cog", *LARGE)]
TRITON_CASES += [(kind, *case, 1.0) for kind in KINDS[1:] for case in KIND_CASES]
TRITON_CASES += [(kind, *LARGE) for kind in KINDS[1:]]


def triton_report() -> list:
    """compare_to_reference for every Triton case, and softmax1 with a learned sink; run in the interpreter child."""
    from uvit_cog.kernels.triton_tiling import INTERPRET, attention_triton

    assert INTERPRET, "set TRITON_INTERPRET=1 before importing triton"
    checks = [compare_to_reference(attention_triton, *case[1:], kind=case[0]) for case in TRITON_CASES]
    return checks + [compare_to_reference(attention_triton, *KIND_CASES[0], kind="softmax1", learned_sink=True)]


def run_interpreted(module: str, function: str):
    """`function()` of the test module `module`, run in a child process with TRITON_INTERPRET=1; its JSON result."""
    script = f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
    script += f"import {module}; print(json.dumps({module}.{function}()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted_checks():
    return run_interpreted("test_kernels", "triton_report")


TRITON_IDS = [str(c[:6]) for c in TRITON_CASES] + ["softmax1 learned sink"]


@pytest.mark.parametrize("index", range(len(TRITON_IDS)), ids=TRITON_IDS)
def test_triton_matches_reference(interpreted_checks, index):
    """Forward and dq, dk, dv of the Triton kernels (interpreted) against the reference, for every kind."""
    assert_matches(interpreted_checks[index])


@pytest.mark.parametrize("N,M,D,dtype,mask_kind", CASES + [(65, 33, 64, torch.bfloat16, "rows")])
def test_cpu_matches_reference(N, M, D, dtype, mask_kind):
    assert_matches(compare_to_reference(attention_cpu, N, M, D, dtype, mask_kind))


@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("case", KIND_CASES + [(65, 33, 64, torch.bfloat16, "rows")], ids=str)
def test_cpu_kinds_match_reference(kind, case):
    assert_matches(compare_to_reference(attention_cpu, *case, kind=kind))


def test_cpu_learned_sink_gradient():
    assert_matches(compare_to_reference(attention_cpu, *KIND_CASES[0], kind="softmax1", learned_sink=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_large_scores_stay_finite(kind, dtype):
    """|s| up to about 1e4: outputs and gradients finite and equal to the reference, in every dtype."""
    assert_matches(compare_to_reference(attention_cpu, *LARGE[:3], dtype, *LARGE[4:], kind=kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("elements,heads_per_block,rows_per_block", [(130, 2, 9), (40, 1, 5)])
def test_cpu_blocking_gradcheck(monkeypatch, kind, elements, heads_per_block, rows_per_block):
    """float64 gradcheck with blocks split over heads, and over query rows (dK, dV summed across blocks)."""
    monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", elements)
    heads, rows = next(iter(cpu_kernels._blocks(3, 9, 7)))
    assert (heads.stop - heads.start, rows.stop - rows.start) == (heads_per_block, rows_per_block)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 3, n, 4, generator=g, dtype=torch.float64).requires_grad_() for n in (9, 7, 7))
    mask = torch.rand(1, 1, 9, 7, generator=g) > 0.3
    mask[0, 0, 4] = False
    row_map = get_attention_kind(kind).row_map
    assert torch.autograd.gradcheck(lambda q, k, v: attention_cpu(q, k, v, mask, 0.7, row_map=row_map), (q, k, v))


def test_cpu_blocks_hold_a_multiple_of_the_thread_count_of_heads(monkeypatch):
    """3 heads' worth of scores on 2 threads gives 2-head blocks: batched matmuls split by head."""
    monkeypatch.setattr(cpu_kernels, "BLOCK_ELEMENTS", 3 * 7 * 7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert [hs.stop - hs.start for hs, _ in cpu_kernels._blocks(5, 7, 7)] == [2, 2, 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert [hs.stop - hs.start for hs, _ in cpu_kernels._blocks(5, 7, 7)] == [3, 2]


def test_cpu_memory_stays_linear_in_sequence_length():
    """Forward+backward at N = 4096 grows peak RSS by far less than one N×N float32 matrix per head.

    Measured in a fresh process as the growth of its peak RSS (VmHWM, reset before each run: a forked
    child's getrusage maxrss starts at the parent's peak) with glibc returning freed blocks to the
    system, so RSS follows live memory; the "torch" impl, which keeps the N×N weights for backward,
    runs afterwards as a control that the measurement sees such matrices.
    """
    script = textwrap.dedent(
        """
        import json, torch
        from uvit_cog import cog_attention
        torch.set_num_threads(1)

        def status(field):
            line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
            return int(line.split()[1]) * 1024

        def grown(n, impl):
            q, k, v = (torch.randn(1, 2, n, 64, requires_grad=True) for _ in range(3))
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            base = status("VmRSS")
            cog_attention(q, k, v, impl=impl).sum().backward()
            return status("VmHWM") - base

        grown(256, "cpu")  # load kernels and thread pools first
        grown(256, "torch")
        print(json.dumps({"fused": grown(4096, "cpu"), "torch": grown(4096, "torch")}))
        """
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    grown = json.loads(result.stdout.strip().splitlines()[-1])
    nxn = 2 * 4096 * 4096 * 4  # one float32 N×N matrix per head: 64 MiB for each of the 2 heads
    assert grown["fused"] < nxn / 4, grown
    assert grown["torch"] > nxn, grown


def test_dispatch_defaults_and_model_agrees_across_impls(monkeypatch):
    """CPU tensors go to the CPU kernel; an Attention layer gives the same outputs and grads with any impl."""
    x = torch.randn(2, 37, 64)
    assert dispatch.default_impl(get_attention_kind("cog"), x, 0.0) == "cpu"
    layer = Attention(64, num_heads=4)
    results = {}
    for impl in ("reference", "torch", "cpu"):
        monkeypatch.setattr(dispatch, "default_impl", lambda kind, q, dropout_p, impl=impl: impl)
        layer.zero_grad()
        out = layer(x)
        out.square().sum().backward()
        results[impl] = (out, layer.qkv.weight.grad.clone())
    for impl in ("torch", "cpu"):
        for got, want in zip(results[impl], results["reference"], strict=True):
            assert_matches([error(got, want, torch.float32, impl)])


def test_triton_impl_needs_cuda_tensors():
    q = torch.randn(1, 1, 4, 16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            cog_attention(q, q, q, impl="triton")
    with pytest.raises(ValueError, match="dtype"):
        cog_attention(q.double(), q.double(), q.double(), impl="triton")


def test_unknown_impl_and_cpu_kernel_on_other_device():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown impl"):
        cog_attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="CPU tensors"):
        cog_attention(q.to("meta"), q.to("meta"), q.to("meta"), impl="cpu")


def test_triton_autotune_configs_fit():
    """Autotuning keeps at least one config for every kernel and only small tiles for float32 dots."""
    pairs = [(32, 32), (64, 64), (128, 64)]
    configs = triton_tuning.configs(pairs)
    for precision in ("ieee", "tf32"):
        kept = triton_tuning.prune(configs, {}, PRECISION=precision)
        assert kept
        limit = 2048 if precision == "ieee" else 8192
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit for c in kept)
    assert len(triton_tuning.prune(configs, {}, PRECISION="ieee")) < len(configs)


def test_triton_kernels_compile_for_hopper():
    """The GPU kernels (not only their interpreted semantics) compile to sm_90 code, without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
    kernels = []
    for kind in KINDS:
        rows = get_attention_kind(kind).row_map.triton_row_map()
        kernels.append((kind, triton_tiling._tiled_fwd, dict(START=rows.start, TILE=rows.tile, FINISH=rows.finish)))
        if kind in ("cog", "softpick"):
            kernels += [(kind, kernel, dict(GRADIENT=rows.gradient))
                        for kernel in (triton_tiling._tiled_bwd_dkdv, triton_tiling._tiled_bwd_dq)]
    for kind, kernel, row_map in kernels:
        consts = {"HAS_MASK": True, "PRECISION": "tf32", "KIND": kind, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128,
                  **row_map}
        signature = {}
        for name in kernel.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = "*bf16"
            elif name in ("Lse", "Delta", "Sink"):
                signature[name] = "*fp32"
            elif name == "Mask":
                signature[name] = "*u8"
            else:
                signature[name] = "fp32" if name in ("qk_scale", "scale", "bias2", "eps") else "i32"
        compiled = compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024
