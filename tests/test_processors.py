"""set_attention: every attention kind inside diffusers' transformers (and UViTModel), at tiny sizes on the CPU.

The references here are written independently of uvit_cog.processors: they patch the attention call itself
(torch's SDPA while an attention module runs, or the dispatch function Flux's module imported) with
`cog_attention_reference` in the layout that call uses, so every attention call of the model is Cog.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_flux

import uvit_cog
from uvit_cog import UViTModel
from uvit_cog.attention import cog_attention_reference, reference_attention
from uvit_cog.processors import CONFIG_KEY, attention_layers, keep_mask, load_model, restore_attention, set_attention

pytestmark = pytest.mark.usefixtures("single_thread")

B, TEXT = 2, 5  # batch, text tokens
# Rows with padded text tokens: the second sample keeps 3 of its 5.
TEXT_KEEP = torch.tensor([[True] * TEXT, [True] * 3 + [False] * (TEXT - 3)])


# --- the four covered models, sized by heads x head_dim, depth and image side (also used by bench/) ---


def dit(heads: int = 2, head_dim: int = 8, depth: int = 3, side: int = 8) -> tuple[torch.nn.Module, dict]:
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, num_layers=depth, sample_size=side,
        patch_size=2, norm_num_groups=1,
    )
    inputs = dict(hidden_states=torch.randn(B, 4, side, side), timestep=torch.tensor([10, 500]),
                  class_labels=torch.tensor([1, 3]))
    return model, inputs


def pixart(heads: int = 2, head_dim: int = 8, depth: int = 3, side: int = 8) -> tuple[torch.nn.Module, dict]:
    """PixArt-α: self-attention, cross-attention to padded text (an additive 0 / -10000 float mask inside)."""
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=depth,
        cross_attention_dim=heads * head_dim, sample_size=side, patch_size=2, caption_channels=12, norm_num_groups=1,
    )
    inputs = dict(hidden_states=torch.randn(B, 4, side, side), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(B, TEXT, 12), encoder_attention_mask=TEXT_KEEP.float(),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs


def sd3(heads: int = 2, head_dim: int = 8, depth: int = 3, side: int = 8) -> tuple[torch.nn.Module, dict]:
    """SD3.5's MMDiT: joint attention with qk RMSNorm, and a second (dual) attention in block 0."""
    model = diffusers.SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=4, num_layers=depth, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=12, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=6, out_channels=4, pos_embed_max_size=side, qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    inputs = dict(hidden_states=torch.randn(B, 4, side, side), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(B, TEXT, 12), pooled_projections=torch.randn(B, 6))
    return model, inputs


def flux(heads: int = 2, head_dim: int = 8, depth: int = 4, side: int = 4) -> tuple[torch.nn.Module, dict]:
    """Flux: dispatch_attention_fn, RoPE, depth/2 double-stream then depth/2 single-stream blocks, a text mask."""
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=depth // 2, num_single_layers=depth - depth // 2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=12, pooled_projection_dim=6,
        axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
    )
    n = side * side
    axis = torch.arange(float(side))
    ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
    keep = torch.cat([TEXT_KEEP, torch.ones(B, n, dtype=torch.bool)], dim=1)  # (B, text + image)
    inputs = dict(hidden_states=torch.randn(B, n, 4), timestep=torch.tensor([0.1, 0.5]),
                  encoder_hidden_states=torch.randn(B, TEXT, 12), pooled_projections=torch.randn(B, 6),
                  img_ids=ids.reshape(n, 3), txt_ids=torch.zeros(TEXT, 3),
                  joint_attention_kwargs={"attention_mask": keep})
    return model, inputs


COVERED: dict[str, Callable[..., tuple[torch.nn.Module, dict]]] = {"dit": dit, "pixart": pixart, "sd3": sd3,
                                                                  "flux": flux}


def build(name: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model, inputs = COVERED[name]()
    return model.eval(), inputs  # eval: DiT drops class labels at random in training mode


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


# --- the independent reference: every attention call of the model computed by a reference function ---


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask == 0


def _sdpa_reference(fn: Callable) -> Callable:
    """SDPA's signature, (B, H, N, D) tensors."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert dropout_p == 0.0 and not is_causal and not enable_gqa
        return fn(query, key, value, _bool_mask(attn_mask), scale)

    return sdpa


def _dispatch_reference(fn: Callable) -> Callable:
    """dispatch_attention_fn's signature, (B, N, H, D) tensors, a (B, M) key mask."""

    def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        mask = _bool_mask(attn_mask)
        mask = mask[:, None, None, :] if mask is not None and mask.ndim == 2 else mask
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return fn(q, k, v, mask, scale).transpose(1, 2)

    return dispatch


@contextlib.contextmanager
def every_attention_call(model: torch.nn.Module, fn: Callable) -> Iterator[None]:
    """Inside the block, every attention call of model's attention modules runs fn(q, k, v, mask, scale).

    Flux's processor calls the dispatch function its module imported: that name is patched. The others call
    torch's SDPA, patched only while an attention module runs (embedders such as HunyuanDiT's attention pool
    also use SDPA, and are not attention layers).
    """
    dispatch, sdpa = transformer_flux.dispatch_attention_fn, F.scaled_dot_product_attention
    transformer_flux.dispatch_attention_fn = _dispatch_reference(fn)
    hooks = []
    for module in model.modules():
        if callable(getattr(module, "processor", None)):
            hooks.append(module.register_forward_pre_hook(
                lambda *_: setattr(F, "scaled_dot_product_attention", _sdpa_reference(fn))))
            hooks.append(module.register_forward_hook(lambda *_: setattr(F, "scaled_dot_product_attention", sdpa)))
    try:
        yield
    finally:
        F.scaled_dot_product_attention, transformer_flux.dispatch_attention_fn = sdpa, dispatch
        for hook in hooks:
            hook.remove()


def cog_reference(q, k, v, mask, scale):
    return cog_attention_reference(q, k, v, mask, scale)


def grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    out = run(model, inputs)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


# --- correctness on the four covered models ---


@pytest.mark.parametrize("name", COVERED)
def test_softmax_kind_equals_the_unmodified_model(name):
    model, inputs = build(name)
    with torch.no_grad():
        expected = run(model, inputs)
        set_attention(model, "softmax", "all")
        got = run(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", COVERED)
def test_cog_equals_the_reference_in_values_and_gradients(name):
    """Outputs and the gradients of every parameter match a model whose every attention call is the reference."""
    model, inputs = build(name)
    with every_attention_call(model, cog_reference):
        expected, expected_grads = grads(model, inputs)
    softmax_out, _ = grads(model, inputs)
    set_attention(model, "cog", "all")
    got, got_grads = grads(model, inputs)
    assert (expected - softmax_out).abs().max() > 1e-3  # the reference is Cog: the check can fail
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    for param, grad in got_grads.items():
        assert grad is not None and torch.isfinite(grad).all(), f"{name}: no finite gradient reached {param}"
        torch.testing.assert_close(grad, expected_grads[param], atol=2e-5, rtol=1e-3, msg=f"{name}: grad {param}")
    attn_weights = [g for p, g in got_grads.items() if ".to_q." in p or ".to_qkv." in p]
    assert attn_weights and all(g.abs().sum() > 0 for g in attn_weights)


@pytest.mark.parametrize("kind", ["sigmoid", "softpick", "softmax1"])
@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_other_kinds_equal_their_reference(name, kind):
    model, inputs = build(name)
    with torch.no_grad(), every_attention_call(model, lambda q, k, v, m, s: reference_attention(kind, q, k, v, m, s)):
        expected = run(model, inputs)
    set_attention(model, kind, "all")
    with torch.no_grad():
        got = run(model, inputs)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", COVERED)
def test_a_training_step_runs(name, autocast):
    model, inputs = build(name)
    set_attention(model, "cog", "all_but_first_last")
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run(model, inputs)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    loss = out.float().square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)) > len(before) // 2


# --- layers= ---


def _routed(model: torch.nn.Module) -> list[bool]:
    """Per layer of attention_layers: whether all of its attention modules compute a routed kind."""
    modules = dict(model.named_modules())
    flags = []
    for _, names in attention_layers(model):
        routed = {hasattr(type(modules[n].processor), "_uvit_cog_kind") for n in names}
        assert len(routed) == 1, "a layer's attention modules share one kind"
        flags.append(routed.pop())
    return flags


def test_layer_order_per_family():
    assert [name for name, _ in attention_layers(build("flux")[0])] == [
        "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert attention_layers(build("pixart")[0])[0] == (
        "transformer_blocks.0", ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2"])
    assert attention_layers(build("sd3")[0])[:2] == [
        ("transformer_blocks.0", ["transformer_blocks.0.attn", "transformer_blocks.0.attn2"]),
        ("transformer_blocks.1", ["transformer_blocks.1.attn"])]
    uvit = UViTModel(sample_size=8, patch_size=2, in_channels=3, embed_dim=16, depth=4, num_heads=2)
    assert [name for name, _ in attention_layers(uvit)] == [
        "in_blocks.0", "in_blocks.1", "mid_block", "out_blocks.0", "out_blocks.1"]


@pytest.mark.parametrize(("layers", "expected"), [
    ("all_but_first_last", [False, True, True, False]),
    ("first_last", [True, False, False, True]),
    ("all", [True] * 4),
    ("none", [False] * 4),
    ([1], [False, True, False, False]),
    ([0, -1], [True, False, False, True]),
])
def test_layers_select_the_blocks(layers, expected):
    model, inputs = build("flux")
    set_attention(model, "cog", layers)
    assert _routed(model) == expected
    if any(expected):
        assert model.config[CONFIG_KEY]["layers"] == layers
    else:
        assert CONFIG_KEY not in model.config


def test_all_but_first_last_output_equals_a_reference_on_the_middle_layers():
    """U-ViC's choice on SD3: the first and last block stay softmax, the middle one is Cog, in values."""
    model, inputs = build("sd3")
    middle = [model.get_submodule(n) for n in attention_layers(model)[1][1]]
    with torch.no_grad(), every_attention_call(torch.nn.ModuleList(middle), cog_reference):
        expected = run(model, inputs)
    set_attention(model, "cog", "all_but_first_last")
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layers", ["every", [4], [True], ["1"]])
def test_bad_layers_are_refused(layers):
    model, _ = build("flux")
    with pytest.raises(ValueError, match="layer"):
        set_attention(model, "cog", layers)


def test_a_later_call_replaces_an_earlier_one_and_none_restores():
    model, inputs = build("dit")
    originals = [m.processor for m in model.modules() if callable(getattr(m, "processor", None))]
    with torch.no_grad():
        expected = run(model, inputs)
        set_attention(model, "cog", "all")
        set_attention(model, "sigmoid", [0])
        assert _routed(model) == [True, False, False]
        assert type(model.transformer_blocks[0].attn1.processor)._uvit_cog_kind == "sigmoid"
        set_attention(model, "cog", "none")
        torch.testing.assert_close(run(model, inputs), expected, atol=0, rtol=0)
    assert [m.processor for m in model.modules() if callable(getattr(m, "processor", None))] == originals
    assert CONFIG_KEY not in model.config


def _helper_attention(q, k, v):
    """A module-level helper that computes attention: set_attention re-binds it for the processor below."""
    return F.scaled_dot_product_attention(q, k, v)


class HelperProcessor:
    """A processor of one's own (self-attention only) whose attention call sits in a helper function."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape
        q, k, v = (f(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        return attn.to_out[0](_helper_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_processors_of_ones_own_with_attention_in_a_helper():
    model, inputs = build("dit")
    for block in model.transformer_blocks:
        block.attn1.set_processor(HelperProcessor())
    with torch.no_grad(), every_attention_call(model, cog_reference):
        expected = run(model, inputs)
    set_attention(model, "cog", "all")
    assert type(model.transformer_blocks[0].attn1.processor).__mro__[1] is HelperProcessor
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), expected, atol=2e-5, rtol=1e-4)
    assert _helper_attention.__globals__["F"] is F  # the module's own helper is untouched


# --- refusals ---


@pytest.mark.parametrize("kind", ["gated", "cog_gated", "diff", "softmax1_sink"])
def test_kinds_with_weights_are_refused(kind):
    model, _ = build("dit")
    with pytest.raises(ValueError, match="weights of its own"):
        set_attention(model, kind)
    assert _routed(model) == [False] * 3


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown attention_type 'coq'"):
        set_attention(build("dit")[0], "coq")


def test_processors_that_do_not_call_sdpa_are_refused_before_anything_changes():
    model, _ = build("pixart")
    model.transformer_blocks[2].attn2.set_processor(diffusers.models.attention_processor.AttnProcessor())
    with pytest.raises(TypeError, match="AttnProcessor computes attention without"):
        set_attention(model, "cog", "all")
    assert _routed(model) == [False] * 3


def test_sana_linear_attention_is_refused():
    """Sana's self-attention is linear (ReLU kernel) attention: there is no softmax to replace."""
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=2)
    with pytest.raises(TypeError, match="SanaLinearAttnProcessor2_0"):
        set_attention(model, "cog", "all")


def test_keep_mask():
    keep = torch.tensor([[True, False, True]])
    assert keep_mask(keep) is keep
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        additive = torch.tensor([[0.0, -10000.0, 0.0]], dtype=dtype)
        assert torch.equal(keep_mask(additive), keep)
        assert torch.equal(keep_mask(torch.tensor([[0.0, float("-inf"), 0.0]], dtype=dtype)), keep)
    with pytest.raises(ValueError, match="additive float mask"):
        keep_mask(torch.tensor([[0.0, -0.5, 0.0]]))
    with pytest.raises(ValueError, match="bool or float"):
        keep_mask(torch.tensor([[1, 0, 1]]))


def test_sdpa_arguments_causal_and_gqa():
    """is_causal and enable_gqa of an SDPA call become a causal bool mask and repeated k/v heads."""
    from uvit_cog.processors import _Functional

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    got = _Functional("cog").scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = cog_attention_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- save and reload ---


@contextlib.contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """Messages diffusers' config loader logs (its handler writes to the original stderr; this collects them)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers.configuration_utils")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_saved_attention_reloads_with_load_model(name, tmp_path):
    model, inputs = build(name)
    set_attention(model, "cog", "all_but_first_last")
    with torch.no_grad():
        expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert record["kind"] == "cog" and record["layers"] == "all_but_first_last" and record["format"] == 2
    with diffusers_warnings() as messages:
        loaded = load_model(tmp_path).eval()
    assert not [m for m in messages if CONFIG_KEY in m]
    assert type(loaded) is type(model) and _routed(loaded) == _routed(model)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-6, rtol=1e-6)


def test_plain_from_pretrained_warns_that_it_loads_softmax(tmp_path):
    model, inputs = build("dit")
    with torch.no_grad():
        softmax_out = run(model, inputs)
    set_attention(model, "cog", "all")
    model.save_pretrained(tmp_path)
    with diffusers_warnings() as messages:
        plain = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert any(CONFIG_KEY in m and "uvit_cog.load_model" in m and "softmax" in m for m in messages), messages
    with torch.no_grad():  # what it warns about: the weights came back, the Cog attention did not
        torch.testing.assert_close(run(plain, inputs), softmax_out, atol=1e-6, rtol=1e-6)


def test_from_config_copies_get_the_attention_back_with_restore_attention():
    """An EMA-style copy built from the config: diffusers drops the record, restore_attention reads it."""
    model, inputs = build("sd3")
    set_attention(model, "softpick", [1, 2])
    copy = restore_attention(diffusers.SD3Transformer2DModel.from_config(model.config), model.config)
    copy.load_state_dict(model.state_dict())
    assert _routed(copy.eval()) == [False, True, True]
    with torch.no_grad():
        torch.testing.assert_close(run(copy, inputs), run(model, inputs), atol=0, rtol=0)
    with pytest.raises(ValueError, match="must hold 'kind' and 'layers'"):
        restore_attention(copy, {CONFIG_KEY: {"kind": "cog"}})


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NotAModel"}))
    with pytest.raises(ValueError, match="_class_name='NotAModel'"):
        load_model(tmp_path)


# --- UViTModel: the choice is its own config ---


def _uvit(**config) -> UViTModel:
    torch.manual_seed(0)
    return UViTModel(sample_size=8, patch_size=2, in_channels=3, embed_dim=16, depth=4, num_heads=2,
                     num_classes=3, **config).eval()


@pytest.mark.parametrize(("kind", "layers"), [("cog", "all_but_first_last"), ("cog", "first_last"),
                                              ("sigmoid", [1, 2]), ("softpick", "all"), ("cog", "none"),
                                              ("softmax", "all")])
def test_uvit_set_attention_is_its_config(kind, layers, tmp_path):
    model = _uvit(attention_type="softmax")
    set_attention(model, kind, layers)
    rebuilt = _uvit(**{k: model.config[k] for k in ("attention_type", "softmax_layers", "attention_layers")})
    assert model.attention_types == rebuilt.attention_types
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        expected = model(x, t, y).sample
        model.save_pretrained(tmp_path)
        loaded = load_model(tmp_path).eval()
        assert loaded.attention_types == model.attention_types
        torch.testing.assert_close(loaded(x, t, y).sample, expected, atol=1e-6, rtol=1e-6)


def test_uvit_default_layers_are_uvic():
    model = _uvit(attention_type="softmax")
    set_attention(model, "cog")
    assert model.attention_types == _uvit(attention_type="cog").attention_types == ["softmax", *["cog"] * 3, "softmax"]
    assert model.config.softmax_layers == "first_last"  # the same words in both: the first and the last block
    set_attention(model, "cog", "first_last")
    assert model.attention_types == ["cog", *["softmax"] * 3, "cog"]
    assert model.config.softmax_layers == "all_but_first_last"


def test_uvit_kinds_with_weights_are_refused():
    with pytest.raises(ValueError, match="weights of its own"):
        set_attention(_uvit(attention_type="softmax"), "gated")
    with pytest.raises(ValueError, match="weights of its own"):
        set_attention(_uvit(attention_type="cog", attention_layers={"gated": [2]}), "cog")


def test_set_attention_is_public():
    assert uvit_cog.set_attention is set_attention and uvit_cog.load_model is load_model


# --- other diffusers transformers that work unchanged (the table in docs/processors.md) ---


def _mask(n: int = TEXT) -> torch.Tensor:
    return TEXT_KEEP.long()[:, :n]


T = torch.tensor([10, 500])
OTHERS: dict[str, Callable[[], tuple[torch.nn.Module, dict]]] = {
    "CogVideoXTransformer3DModel": lambda: (diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=TEXT),
        dict(hidden_states=torch.randn(B, 3, 4, 8, 8), encoder_hidden_states=torch.randn(B, TEXT, 12), timestep=T)),
    "HunyuanDiT2DModel": lambda: (diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=TEXT,
        text_len_t5=TEXT, use_style_cond_and_image_meta_size=False),
        dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=T.float(), encoder_hidden_states=torch.randn(B, TEXT, 16),
             text_embedding_mask=_mask().float(), encoder_hidden_states_t5=torch.randn(B, TEXT, 16),
             text_embedding_mask_t5=_mask().float())),
    "LTXVideoTransformer3DModel": lambda: (diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=12),
        dict(hidden_states=torch.randn(B, 32, 4), encoder_hidden_states=torch.randn(B, TEXT, 12), timestep=T,
             encoder_attention_mask=_mask(), num_frames=2, height=4, width=4)),
    "WanTransformer3DModel": lambda: (diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12, freq_dim=16,
        ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        dict(hidden_states=torch.randn(B, 4, 2, 8, 8), timestep=T, encoder_hidden_states=torch.randn(B, TEXT, 12))),
    "AuraFlowTransformer2DModel": lambda: (diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=64),
        dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, TEXT, 12), timestep=T)),
    "Lumina2Transformer2DModel": lambda: (diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(32, 32, 32),
        cap_feat_dim=12),
        dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=T / 1000, encoder_hidden_states=torch.randn(B, TEXT, 12),
             encoder_attention_mask=TEXT_KEEP)),
    "QwenImageTransformer2DModel": lambda: (diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4)),
        dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, TEXT, 12),
             encoder_hidden_states_mask=_mask(), timestep=T / 1000, img_shapes=[(1, 4, 4)] * B)),
    "CogView4Transformer2DModel": lambda: (diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=12, time_embed_dim=8, condition_dim=4, pos_embed_max_size=8, sample_size=8,
        rope_axes_dim=(8, 8)),
        dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, TEXT, 12), timestep=T,
             original_size=torch.tensor([[8, 8]] * B), target_size=torch.tensor([[8, 8]] * B),
             crop_coords=torch.tensor([[0, 0]] * B))),
    "ChromaTransformer2DModel": lambda: (diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1),
        dict(hidden_states=torch.randn(B, 16, 4), encoder_hidden_states=torch.randn(B, TEXT, 12), timestep=T / 1000,
             img_ids=torch.randn(16, 3), txt_ids=torch.zeros(TEXT, 3))),
    "MochiTransformer3DModel": lambda: (diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=TEXT),
        dict(hidden_states=torch.randn(B, 4, 2, 8, 8), encoder_hidden_states=torch.randn(B, TEXT, 16), timestep=T,
             encoder_attention_mask=_mask())),
    "HunyuanVideoTransformer3DModel": lambda: (diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
        guidance_embeds=False),
        dict(hidden_states=torch.randn(B, 4, 2, 8, 8), timestep=T, encoder_hidden_states=torch.randn(B, TEXT, 12),
             encoder_attention_mask=_mask(), pooled_projections=torch.randn(B, 8))),
    "AllegroTransformer3DModel": lambda: (diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=2, caption_channels=12),
        dict(hidden_states=torch.randn(B, 4, 2, 8, 8), encoder_hidden_states=torch.randn(B, TEXT, 12), timestep=T)),
    "StableAudioDiTModel": lambda: (diffusers.StableAudioDiTModel(
        sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=12, cross_attention_input_dim=12),
        dict(hidden_states=torch.randn(B, 4, 16), timestep=T, encoder_hidden_states=torch.randn(B, TEXT, 12),
             global_hidden_states=torch.randn(B, 1, 12))),
}


@pytest.mark.parametrize("name", OTHERS)
def test_other_diffusers_transformers_work_unchanged(name):
    torch.manual_seed(0)
    model, inputs = OTHERS[name]()
    model.eval()
    with torch.no_grad():
        softmax_out = run(model, inputs)
        with every_attention_call(model, cog_reference):
            expected = run(model, inputs)
        set_attention(model, "softmax", "all")
        torch.testing.assert_close(run(model, inputs), softmax_out, atol=1e-6, rtol=1e-6)
        set_attention(model, "cog", "all")
        got = run(model, inputs)
    assert (expected - softmax_out).abs().max() > 1e-5
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
