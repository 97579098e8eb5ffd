"""Every attention kind against a plain, independent float64 implementation; modules, capture and tiny models.

The straightforward implementations below loop over rows and apply each paper's formula literally
(exponentials unshifted, so they are only used where float64 does not overflow); the library's
reference (max-shifted), the fused CPU path and SDPA must all agree with them.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uvit_cog import ATTENTION_KINDS, UViTModel, attention_variants, capture_attention, cog_attention
from uvit_cog.attention import Attention, cog_weights, diff_lambda_init, make_attention, register_attention_kind

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PARAMETER_FREE = ("softmax", "cog", "sigmoid", "softpick", "softmax1")


def row_weights(kind, s, keep):
    """One row's weights from float64 scores s (M,) and a bool keep (M,), straight from the formulas."""
    M = s.shape[0]
    if kind == "sigmoid":
        return keep / (1 + torch.exp(-(s - math.log(M))))
    if kind == "softpick":
        u = (torch.exp(s) - 1) * keep
        return u.clamp_min(0) / (u.abs().sum() + 1e-6)
    e = torch.exp(s.abs() if kind == "cog" else s) * keep
    if kind == "softmax1":
        return e / (1 + e.sum())
    if e.sum() == 0:  # softmax and cog: a row with no kept key gives zeros
        return e
    return (torch.sign(s) if kind == "cog" else 1) * e / e.sum()


def straightforward(kind, q, k, v, mask=None):
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    M = k.shape[2]
    keep = torch.ones(B, H, N, M, dtype=torch.bool) if mask is None else mask.expand(B, H, N, M)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                s = (k[b, h] @ q[b, h, i]) * D**-0.5
                out[b, h, i] = row_weights(kind, s, keep[b, h, i].double()) @ v[b, h]
    return out


def rand_qkv(N=9, M=9, D=8, magnitude=1.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, N, D, generator=g) * magnitude
    k = torch.randn(2, 2, M, D, generator=g) * magnitude
    v = torch.randn(2, 2, M, D, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def impls(kind):
    return ["reference", "cpu"] + (["sdpa"] if kind == "softmax" else []) + (["torch"] if kind == "cog" else [])


@pytest.mark.parametrize("kind", PARAMETER_FREE)
@pytest.mark.parametrize("N,M", [(9, 9), (5, 13), (1, 7)])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_straightforward(kind, N, M, masked):
    q, k, v = rand_qkv(N=N, M=M)
    mask = None
    if masked:
        mask = torch.rand(2, 1, N, M, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0, 0, 0] = False  # one row with no kept key
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = straightforward(kind, q64, k64, v64, mask)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g)
    for impl in impls(kind):
        out = attention_variants[kind](q, k, v, attn_mask=mask, impl=impl)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"{kind} {impl}")
        if masked:
            assert torch.all(out[0, :, 0] == 0), f"{kind} {impl}: the row with no kept key is not zero"
        grads = torch.autograd.grad(out, (q, k, v), g.float())
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=f"{kind} {impl} grad")


@pytest.mark.parametrize("kind", PARAMETER_FREE)
def test_extreme_scores_stay_finite_and_agree(kind):
    """|s| up to about 1e4: finite values and gradients, the fused path's output and dv equal to the reference.

    (The weights are then nearly one-hot, where dq and dk are rounding noise around ~0 on every path.)
    """
    q, k, v = rand_qkv(N=8, M=8, D=4, magnitude=1.0)
    results = []
    for impl in impls(kind):
        out = attention_variants[kind](q * 100, k * 100, v, impl=impl)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads), f"{kind} {impl}"
        results.append((out, grads[2]))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", PARAMETER_FREE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_stay_finite_and_close(kind, dtype):
    q, k, v = rand_qkv(N=16, M=16, D=16, magnitude=2.0, dtype=dtype)
    ref = straightforward(kind, q.detach(), k.detach(), v.detach())
    for impl in impls(kind):
        out = attention_variants[kind](q, k, v, impl=impl)
        assert out.dtype == dtype and torch.isfinite(out).all(), f"{kind} {impl}"
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(torch.isfinite(t).all() for t in grads), f"{kind} {impl}"
        torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
        # Scores beyond fp16's range (|s| > 65504 if formed in fp16) are formed and normalised in fp32.
        assert torch.isfinite(attention_variants[kind](q * 30, k * 30, v, impl=impl)).all(), f"{kind} {impl}"


def test_softmax1_learned_sink_and_sigmoid_bias_are_the_formulas():
    q, k, v = (t.detach().double() for t in rand_qkv(N=4, M=6))
    sink = torch.tensor([0.5, -2.0], dtype=torch.float64)
    s = q @ k.transpose(-2, -1) / math.sqrt(8)
    e = s.exp()
    want = (e / (sink.view(1, 2, 1, 1).exp() + e.sum(-1, keepdim=True))) @ v
    torch.testing.assert_close(attention_variants["softmax1"](q, k, v, sink=sink), want)
    torch.testing.assert_close(attention_variants["softmax1"](q, k, v, sink=sink, impl="cpu"), want)
    want = torch.sigmoid(s + 0.3) @ v
    torch.testing.assert_close(attention_variants["sigmoid"](q, k, v, bias=0.3), want)
    with pytest.raises(ValueError, match=r"sink must be a float or an \(H,\)"):
        attention_variants["softmax1"](q, k, v, sink=torch.zeros(3))


def test_registry_describes_every_kind():
    assert set(PARAMETER_FREE) <= set(ATTENTION_KINDS) and set(attention_variants) == set(PARAMETER_FREE)
    assert {"gated", "diff", "cog_gated", "softmax1_sink"} <= set(ATTENTION_KINDS)
    for name, kind in ATTENTION_KINDS.items():
        assert kind.name == name and kind.formula and kind.reference
        assert kind.has_parameters == (name not in PARAMETER_FREE)
    assert ATTENTION_KINDS["cog"].negative_weights and ATTENTION_KINDS["diff"].negative_weights
    assert not ATTENTION_KINDS["softpick"].negative_weights and ATTENTION_KINDS["softpick"].sparse
    assert ATTENTION_KINDS["softmax1"].sink and not ATTENTION_KINDS["softmax"].sink
    assert attention_variants["cog"] is cog_attention
    with pytest.raises(ValueError, match="registered already"):
        register_attention_kind(name="cog", formula="", reference="", weights=cog_weights)
    with pytest.raises(ValueError, match="base 'linear'"):
        register_attention_kind(name="x", formula="", reference="", base="linear", gate="elementwise")
    with pytest.raises(ValueError, match="needs weights"):
        register_attention_kind(name="x", formula="", reference="")
    with pytest.raises(ValueError, match="give base="):
        register_attention_kind(name="x", formula="", reference="", weights=cog_weights, gate="elementwise")
    with pytest.raises(ValueError, match=r"arguments \['tau'\] do not reach the fused kernels"):
        register_attention_kind(name="x", formula="", reference="", weights=cog_weights, arguments={"tau": 1.0},
                                row_map=ATTENTION_KINDS["cog"].row_map)
    assert "x" not in ATTENTION_KINDS  # nothing refused was registered


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_module_output_is_its_captured_weights_applied(kind):
    """Each layer's output equals proj(post(w v)) with the weights `capture_attention` recorded."""
    torch.manual_seed(0)
    layer = make_attention(kind, 16, 4, layer_index=2).eval()
    with torch.no_grad():
        layer.qkv.weight.mul_(8)  # scores of order one
    x = torch.randn(2, 7, 16)
    with capture_attention(layer) as cap, torch.no_grad():
        y = layer(x)
    w = cap.maps[""][0]
    assert cap.types[""] == kind
    qkv = layer.qkv(x).reshape(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)
    v = qkv[2]
    spec = ATTENTION_KINDS[kind]
    with torch.no_grad():
        if spec.differential:  # the official code's layout: value of head i = sub-heads 2i, 2i+1
            assert w.shape == (2, 2, 7, 7)
            v2 = v.transpose(1, 2).reshape(2, 7, 2, 8).transpose(1, 2)
            heads = layer.subln(w @ v2) * (1 - diff_lambda_init(2))
        else:
            assert w.shape == (2, 4, 7, 7)
            heads = w @ v
        heads = heads.transpose(1, 2)
        if spec.gate is not None:
            heads = heads * torch.sigmoid(layer.gate(x)).view(2, 7, 4, -1)
        torch.testing.assert_close(y, layer.proj(heads.reshape(2, 7, 16)), rtol=1e-5, atol=1e-5)
    assert (w < 0).any() == spec.negative_weights


def test_diff_matches_the_official_formulation():
    """DifferentialAttention against Ye et al.'s multihead_diffattn.py written out (softmax, λ, subln)."""
    torch.manual_seed(0)
    layer = make_attention("diff", 32, 4, layer_index=3)
    x = torch.randn(2, 5, 32)
    h, d = 2, 8  # 2 differential heads of 2 sub-heads of size 8
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    q, k = q.view(2, 5, 2 * h, d).transpose(1, 2), k.view(2, 5, 2 * h, d).transpose(1, 2)
    v = v.view(2, 5, h, 2 * d).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1).view(2, h, 2, 5, 5)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * 3)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + lam_init)
    out = (attn[:, :, 0] - lam * attn[:, :, 1]) @ v
    out = layer.subln(out) * (1 - lam_init)
    want = layer.proj(out.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(layer(x).square().sum(), [layer.lambda_q1, layer.qkv.weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="num_heads must be even"):
        make_attention("diff", 18, 3)


def test_softmax1_sink_is_learned():
    layer = make_attention("softmax1_sink", 16, 2)
    layer(torch.randn(2, 5, 16)).square().sum().backward()
    assert layer.sink.grad is not None and layer.sink.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown attention_type"):
        Attention(16, 2, attention_type="linear")


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_tiny_model_of_each_kind_overfits_one_batch(kind):
    """A tiny U-ViT whose every block is `kind` fits one fixed batch of real MNIST digits: loss falls by 70%."""
    torch.manual_seed(0)
    digits = np.load(DATA / "mnist.npz")["x_train"][:8, ::4, ::4][:, :6, :6]  # 6x6 crops
    x0 = torch.from_numpy(digits.astype(np.float32) / 127.5 - 1).unsqueeze(1)
    model = UViTModel(sample_size=6, patch_size=2, in_channels=1, embed_dim=32, depth=2, num_heads=4,
                      attention_type=kind, softmax_layers="none")
    assert model.attention_types == [kind] * 3
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (8,))
    alpha = torch.cos(t.float() / 1000 * torch.pi / 2).view(-1, 1, 1, 1)
    xt = alpha * x0 + (1 - alpha**2).sqrt() * noise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = F.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), (losses[:5], losses[-5:])
