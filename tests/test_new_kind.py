"""A new attention kind, added the way a user would: one registration and its row map's code, nothing else.

ReLU attention (Wortsman et al. 2023, arXiv 2309.08586), w = ReLU(s)/M: the kind is declared with
`register_attention_kind`, its fused row map written for the blocked CPU path (a forward map and its gradient) and
for Triton (a tile and its gradient; the start and the end of a row map without a normaliser come from
`uvit_cog.kernels.triton_rows`). It then runs through every path: its reference against the formula, the CPU
kernel and the Triton kernels (interpreted, in a child process) against the reference, inside UViTModel and inside
a diffusers model through set_attention. docs/attention.md walks through the same code.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from test_kernels import KIND_CASES, LARGE, assert_matches, compare_to_reference, run_interpreted
from test_processors import build, every_attention_call, run

import uvit_cog.attention.dispatch as dispatch
from uvit_cog import UViTModel, attention_variants, capture_attention, set_attention
from uvit_cog.attention import ATTENTION_KINDS, kernel_kinds, make_attention, reference_attention
from uvit_cog.attention import register_attention_kind as register
from uvit_cog.attention.weights import scores
from uvit_cog.kernels import CPURowMap, RowMap, TritonRowMap
from uvit_cog.kernels.cpu import attention_cpu
from uvit_cog.kernels.triton_rows import finish_unnormalised, start_zero, unnormalised

# --- the user's code: the reference weights, the CPU row map, the Triton row map, the declaration ---


def relu_weights(q, k, attn_mask=None, scale=None, bias=None):
    """ReLU(s)·e^b with b = −log M by default (Wortsman et al.'s ReLU(s)/M); masked keys weigh 0."""
    w = torch.relu(scores(q, k, scale)) * math.exp(-math.log(k.shape[-2]) if bias is None else bias)
    return w if attn_mask is None else w.masked_fill(~attn_mask, 0.0)


def relu_rows(s, drop, bufs, params):
    """w = ReLU(s)·e^b in place in the block's scores; aux = e^b, for the gradient."""
    factor = math.exp(params["bias"])
    w = s.clamp_min_(0.0).mul_(factor)
    if drop is not None:
        w.masked_fill_(drop, 0.0)
    return w, factor


def relu_rows_gradient(dp, w, aux, delta):
    """dS = [s > 0]·e^b·dP, in place in dP (w > 0 exactly where s > 0 and the key is kept)."""
    return dp.mul_(w > 0).mul_(aux)


LN2 = tl.constexpr(math.log(2.0))  # the Triton kernels hand row maps base-2 scores s·log2 e: s·ln 2 is the score


@triton.jit
def relu_tile(s, keep, m, bias2):
    return unnormalised(tl.where(keep & (s > 0), s * LN2 * tl.exp2(bias2), 0.0), m)


@triton.jit
def relu_gradient(s, keep, dp, lse, delta, bias2):
    positive = keep & (s > 0)
    return tl.where(positive, s * LN2 * tl.exp2(bias2), 0.0), tl.where(positive, tl.exp2(bias2) * dp, 0.0)


RELU_TRITON = TritonRowMap(start=start_zero, tile=relu_tile, finish=finish_unnormalised, gradient=relu_gradient)
RELU = dict(
    name="relu", formula="w = ReLU(s)/M", reference="Wortsman et al. 2023, arXiv 2309.08586", sparse=True,
    weights=relu_weights, arguments={"bias": None},  # the kernels' `bias` slot: b = −log M by default
    row_map=RowMap(name="relu", cpu=CPURowMap(forward=relu_rows, gradient=relu_rows_gradient),
                   triton=f"{__name__}:RELU_TRITON"),
)

# --- the tests ---


@pytest.fixture
def relu():
    """The kind registered for one test, and gone after it (the registry is shared by every test)."""
    kind = register(**RELU)
    yield kind
    del ATTENTION_KINDS["relu"]


def test_registration_alone_makes_it_a_kind(relu):
    assert attention_variants["relu"] is relu.function and "relu" in kernel_kinds()
    assert relu.impls == ("reference", "cpu", "triton") and relu.base == "relu" and not relu.has_parameters
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    s = q @ k.transpose(-2, -1) / 2.0  # D = 4: scale 1/2
    want = (s.clamp_min(0) / 6 * mask) @ v  # the formula, straight
    torch.testing.assert_close(reference_attention("relu", q, k, v, mask), want)
    torch.testing.assert_close(attention_variants["relu"](q, k, v, mask, impl="reference"), want)
    torch.testing.assert_close(attention_variants["relu"](q, k, v, mask), want)  # the CPU kernel, the default


@pytest.mark.parametrize("case", [*KIND_CASES, (65, 33, 64, torch.bfloat16, "rows")], ids=str)
def test_cpu_kernel_matches_the_reference(relu, case):
    assert_matches(compare_to_reference(attention_cpu, *case, kind="relu"))


def test_cpu_kernel_gradcheck_across_blocks(relu, monkeypatch):
    monkeypatch.setattr("uvit_cog.kernels.cpu.BLOCK_ELEMENTS", 40)  # blocks of 5 query rows: dK, dV summed
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 3, n, 4, generator=g, dtype=torch.float64).requires_grad_() for n in (9, 7, 7))
    mask = torch.rand(1, 1, 9, 7, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda q, k, v: attention_cpu(q, k, v, mask, 0.7, row_map=relu.row_map),
                                    (q, k, v))


def triton_report() -> list:
    """The Triton kernels of the new kind against the reference; run in the interpreter child."""
    from uvit_cog.kernels.triton_tiling import INTERPRET, attention_triton

    assert INTERPRET, "set TRITON_INTERPRET=1 before importing triton"
    register(**RELU)
    return [compare_to_reference(attention_triton, *case, kind="relu") for case in KIND_CASES] + [
        compare_to_reference(attention_triton, *LARGE, kind="relu")]


def test_triton_kernels_match_the_reference_interpreted():
    for checks in run_interpreted("test_new_kind", "triton_report"):
        assert_matches(checks)


def test_uvit_model_runs_it_on_every_path(relu, monkeypatch):
    """A U-ViT of the new kind: each layer applies the weights it reports, and the fused CPU path trains the model
    as the reference does (outputs and every gradient)."""
    torch.manual_seed(0)
    layer = make_attention("relu", 16, 4).eval()
    x = torch.randn(2, 7, 16)
    with capture_attention(layer) as cap, torch.no_grad():
        y = layer(x)
    w = cap.maps[""][0]
    assert cap.types[""] == "relu" and (w >= 0).all() and (w == 0).any()
    v = layer.qkv(x).reshape(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close(y, layer.proj((w @ v).transpose(1, 2).reshape(2, 7, 16)), rtol=1e-5, atol=1e-5)
    model = UViTModel(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, attention_type="relu",
                      softmax_layers="none")
    assert model.attention_types == ["relu"] * 3
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    results = {}
    for impl in ("reference", "cpu"):
        monkeypatch.setattr(dispatch, "default_impl", lambda kind, q, dropout_p, impl=impl: impl)
        model.zero_grad()
        out = model(x, t).sample
        out.square().mean().backward()
        results[impl] = [out, *(p.grad for p in model.parameters())]
    for got, want in zip(results["cpu"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_set_attention_puts_it_into_a_diffusers_model(relu):
    model, inputs = build("dit")
    with torch.no_grad(), every_attention_call(model, lambda q, k, v, m, s: reference_attention("relu", q, k, v, m, s)):
        expected = run(model, inputs)
    set_attention(model, "relu", "all")
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), expected, atol=2e-5, rtol=1e-4)
