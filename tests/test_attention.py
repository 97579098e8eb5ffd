"""Cog attention against an independent float64 formula, its gradients, masks, stability and the module."""

import pytest
import torch
import torch.nn.functional as F

from uvit_cog import Attention, capture_attention, cog_attention
from uvit_cog.attention import CogAttentionFunction, cog_weights


def straightforward_cog(q, k, v, mask=None, scale=None):
    """w = sign(s)·exp(|s|)/Σ_kept exp(|s|), written with explicit loops over rows in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, N, _ = q.shape
    M = k.shape[2]
    keep = torch.ones(B, H, N, M, dtype=torch.bool) if mask is None else mask.expand(B, H, N, M)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                s = (k[b, h] @ q[b, h, i]) * scale
                e = torch.exp(s.abs()) * keep[b, h, i]
                if e.sum() > 0:
                    out[b, h, i] = (torch.sign(s) * e / e.sum()) @ v[b, h]
    return out


def rand_qkv(B=2, H=2, N=9, M=9, D=8, scale=1.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * scale
    k = torch.randn(B, H, M, D, generator=g) * scale
    v = torch.randn(B, H, M, D, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("N,M", [(9, 9), (5, 13), (1, 7)])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_straightforward(impl, N, M, masked):
    q, k, v = rand_qkv(N=N, M=M)
    mask = None
    if masked:
        mask = torch.rand(2, 1, N, M, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0, 0, 0] = False  # one row with no kept key
    out = cog_attention(q, k, v, attn_mask=mask, impl=impl)
    ref = straightforward_cog(q.detach(), k.detach(), v.detach(), mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if masked:
        assert torch.all(out[0, :, 0] == 0)

    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(straightforward_cog(q64, k64, v64, mask), (q64, k64, v64), g.double())
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_weights_have_both_signs_and_unit_l1_rows():
    q, k, _ = rand_qkv(N=16, M=16)
    w = cog_weights(q.detach(), k.detach())
    assert (w < 0).any() and (w > 0).any()
    torch.testing.assert_close(w.abs().sum(-1), torch.ones(w.shape[:-1]))


def test_mask_applies_after_absolute_value():
    # A strongly negative score must dominate as a strongly negative weight, not vanish like in softmax.
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[-10.0, 0.0], [0.1, 0.0], [5.0, 0.0]]]])
    v = torch.eye(3)[None, None, :, :2].clone()
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])
    mask = torch.tensor([True, True, False])  # broadcast over (B, H, N, M)
    w = cog_weights(q, k, mask, scale=1.0)
    assert w[0, 0, 0, 0] < -0.99 and w[0, 0, 0, 2] == 0
    out = cog_attention(q, k, v, attn_mask=mask, scale=1.0)
    torch.testing.assert_close(out, w @ v)


def test_gradcheck_float64():
    q, k, v = (t.detach().double().requires_grad_() for t in rand_qkv(B=1, H=2, N=4, M=5, D=3))
    mask = torch.tensor([True, False, True, True, True])
    assert torch.autograd.gradcheck(lambda a, b, c: CogAttentionFunction.apply(a, b, c, None, 0.7), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: CogAttentionFunction.apply(a, b, c, mask, 0.7), (q, k, v))


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_extreme_scores_stay_finite(impl):
    q, k, v = rand_qkv(N=8, M=8, D=4, scale=1.0)
    # |s| up to about 1e4 in fp32.
    out = cog_attention(q * 100, k * 100, v, impl=impl)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_half_precision_inputs_stay_finite_and_close(dtype, impl):
    q, k, v = rand_qkv(N=16, M=16, D=16, scale=3.0, dtype=dtype)
    out = cog_attention(q, k, v, impl=impl)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = straightforward_cog(q.detach(), k.detach(), v.detach())
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
    # Scores that overflow fp16 if formed in fp16 (|s| > 65504) are normalised in fp32.
    big = cog_attention(q * 30, k * 30, v, impl=impl)
    assert torch.isfinite(big).all()


def test_bad_arguments_are_named():
    q, k, v = rand_qkv()
    with pytest.raises(ValueError, match="bool"):
        cog_attention(q, k, v, attn_mask=torch.zeros(9, 9))
    with pytest.raises(ValueError, match="impl"):
        cog_attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        cog_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="head dim"):
        cog_attention(q, k[..., :4], v)


def test_attention_module_types_and_capture():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    soft = Attention(16, num_heads=2, attention_type="softmax").eval()
    cog = Attention(16, num_heads=2, attention_type="cog").eval()
    cog.load_state_dict(soft.state_dict())
    # softmax goes through SDPA: compare with explicit softmax weights.
    with capture_attention(soft) as cap_soft, capture_attention(cog) as cap_cog:
        y_soft, y_cog = soft(x), cog(x)
    w_soft, w_cog = cap_soft.maps[""][0], cap_cog.maps[""][0]
    assert w_soft.shape == (2, 2, 7, 7) and (w_soft >= 0).all() and (w_cog < 0).any()
    qkv = soft.qkv(x).reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    manual = (torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / 8**0.5, -1) @ qkv[2]).transpose(1, 2)
    torch.testing.assert_close(y_soft, soft.proj(manual.reshape(2, 7, 16)), rtol=1e-5, atol=1e-5)
    manual_cog = (w_cog @ qkv[2]).transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(y_cog, cog.proj(manual_cog), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_soft, y_cog)
    # Outside the block nothing is captured any more.
    assert soft._capture is None and cog._capture is None
    cog(x)
    assert len(cap_cog.maps[""]) == 1


def test_attention_module_rejects_bad_config():
    with pytest.raises(ValueError, match="attention_type"):
        Attention(16, 2, attention_type="linear")
    with pytest.raises(ValueError, match="divisible"):
        Attention(15, 2)


def test_sdpa_is_used_for_softmax(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    Attention(16, 2, attention_type="softmax")(torch.randn(1, 3, 16))
    assert calls == [1]
