"""Cog attention specifics: signed weights, masks after |s|, gradcheck of the lean Function, errors and the module.

Values, gradients, masks, extreme scores and half precision of every kind (cog included) against literal
formulas are in test_variants.py.
"""

import pytest
import torch
import torch.nn.functional as F

from uvit_cog import Attention, capture_attention, cog_attention
from uvit_cog.attention import CogAttentionFunction, cog_weights


def rand_qkv(B=2, H=2, N=9, M=9, D=8, scale=1.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * scale
    k = torch.randn(B, H, M, D, generator=g) * scale
    v = torch.randn(B, H, M, D, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


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
