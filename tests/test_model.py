"""UViTModel: faithfulness to the official U-ViT, softmax-layer placement, presets, I/O and errors."""

import json
from pathlib import Path

import pytest
import torch

from uvit_cog import UViTModel
from uvit_cog.model import PRESETS

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def tiny(**overrides):
    cfg = dict(sample_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=4, num_heads=2)
    return UViTModel(**{**cfg, **overrides})


@pytest.mark.parametrize(
    "softmax_layers,expected",
    [
        ("first_last", ["softmax"] + ["cog"] * 11 + ["softmax"]),
        ("all_but_first_last", ["cog"] + ["softmax"] * 11 + ["cog"]),
        ([0, -1], ["softmax"] + ["cog"] * 11 + ["softmax"]),
        ("none", ["cog"] * 13),
        ("all", ["softmax"] * 13),
        ([1, 6, 12], ["cog", "softmax"] + ["cog"] * 4 + ["softmax"] + ["cog"] * 5 + ["softmax"]),
    ],
)
def test_softmax_layer_placement(softmax_layers, expected):
    with torch.device("meta"):
        model = UViTModel(embed_dim=64, depth=12, num_heads=2, softmax_layers=softmax_layers)
    assert model.attention_types == expected
    assert model.mid_block is model.blocks[6]


@pytest.mark.parametrize(
    "attention_type,softmax_layers,attention_layers,expected",
    [
        ("sigmoid", "first_last", None, ["softmax", "sigmoid", "sigmoid", "sigmoid", "softmax"]),
        ("cog", "first_last", {"gated": [2], "diff": "first_last"}, ["diff", "cog", "gated", "cog", "diff"]),
        ("softmax", "none", {"softpick": [1, 3]}, ["softmax", "softpick", "softmax", "softpick", "softmax"]),
    ],
)
def test_attention_layers_place_kinds(attention_type, softmax_layers, attention_layers, expected):
    model = tiny(attention_type=attention_type, softmax_layers=softmax_layers, attention_layers=attention_layers)
    assert model.attention_types == expected
    assert [type(b.attn).__name__ for b in model.blocks].count("DifferentialAttention") == expected.count("diff")


def test_attention_layers_errors_name_the_field():
    with pytest.raises(ValueError, match="block 2 is given both"):
        tiny(attention_layers={"gated": [2], "sigmoid": [2, 3]})
    with pytest.raises(ValueError, match=r"attention_layers\['gated'\] \[7\] out of range"):
        tiny(attention_layers={"gated": [7]})
    with pytest.raises(ValueError, match="unknown attention_type 'linear'"):
        tiny(attention_layers={"linear": [0]})


def test_every_kind_round_trips_through_from_pretrained(tmp_path):
    """Per-block kinds (with their parameters: gates, sinks, λ) are stored in the config and reload exactly."""
    layers = {"gated": [0], "diff": [1], "softmax1_sink": [3], "cog_gated": [4]}
    model = tiny(attention_type="softpick", attention_layers=layers)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention_layers"] == layers and config["attention_type"] == "softpick"
    loaded = UViTModel.from_pretrained(tmp_path)
    assert loaded.attention_types == ["gated", "diff", "softpick", "softmax1_sink", "cog_gated"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 10).sample, model(x, 10).sample, rtol=0, atol=0)


def test_config_without_attention_layers_loads_as_before(tmp_path):
    """A config written before `attention_layers` existed (attention_type + softmax_layers) builds the same model."""
    model = tiny(softmax_layers=[0, 2])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attention_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = UViTModel.from_pretrained(tmp_path)
    assert loaded.attention_types == ["softmax", "cog", "softmax", "cog", "cog"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 10).sample, model(x, 10).sample, rtol=0, atol=0)


def test_softmax_model_has_no_cog_layer():
    with torch.device("meta"):
        model = UViTModel(embed_dim=64, depth=12, num_heads=2, attention_type="softmax", softmax_layers="none")
    assert set(model.attention_types) == {"softmax"}


def _official_to_ours(cfg):
    names = {"img_size": "sample_size", "in_chans": "in_channels", "conv": "final_conv"}
    out = {names.get(k, k): v for k, v in cfg.items()}
    out["num_classes"] = max(out.get("num_classes", -1) - 1, 0)
    return out


@pytest.mark.parametrize("name", list(json.loads((REFERENCE / "uvit_official_presets.json").read_text())))
def test_official_configurations_match_parameter_count_and_tensors(name):
    ref = json.loads((REFERENCE / "uvit_official_presets.json").read_text())[name]
    with torch.device("meta"):
        model = UViTModel(**_official_to_ours(ref["config"]))
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict_shapes"]


def test_presets_build_published_sizes():
    with torch.device("meta"):
        small = UViTModel.from_preset("uvit-small", sample_size=32, patch_size=2)
        huge = UViTModel.from_preset("uvit-huge", sample_size=32, patch_size=2, in_channels=4,
                                     num_classes=1000, final_conv=False)
    assert sum(p.numel() for p in small.parameters()) == 44_255_328
    assert sum(p.numel() for p in huge.parameters()) == 500_832_016
    assert set(PRESETS) == {"uvit-small", "uvit-small-deep", "uvit-mid", "uvit-large", "uvit-huge"}
    with pytest.raises(ValueError, match="unknown preset"):
        UViTModel.from_preset("uvit-giant")


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("attention_type,key", [("softmax", "out_softmax"), ("cog", "out_cog_first_last_softmax")])
def test_official_fixtures_reproduced(index, attention_type, key):
    fixture = torch.load(REFERENCE / "uvit_official_fixtures.pt", weights_only=True)[index]
    model = UViTModel.from_official_state_dict(
        fixture["state_dict"], **fixture["config"], attention_type=attention_type
    ).eval()
    with torch.no_grad():
        out = model(fixture["x"], fixture["timesteps"], fixture["y"]).sample
    torch.testing.assert_close(out, fixture[key], rtol=1e-5, atol=1e-5)


def test_official_state_dict_mismatch_is_reported():
    fixture = torch.load(REFERENCE / "uvit_official_fixtures.pt", weights_only=True)[0]
    cfg = {**fixture["config"], "depth": 6}
    with pytest.raises(ValueError, match="missing"):
        UViTModel.from_official_state_dict(fixture["state_dict"], **cfg)


def test_save_load_round_trip(tmp_path):
    model = tiny(num_classes=3, softmax_layers=[0, 2], mlp_time_embed=True, id2label={0: "a", 1: "b", 2: "c"})
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = UViTModel.from_pretrained(tmp_path)
    assert loaded.attention_types == model.attention_types
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(model.config)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 10, y).sample, model(x, 10, y).sample, rtol=0, atol=0)


def test_timestep_forms_agree():
    model = tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, 250).sample
        b = model(x, torch.tensor(250)).sample
        c = model(x, torch.tensor([250, 250])).sample
        d = model(x, torch.tensor([250.0, 10.0])).sample
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a[1], d[1])


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 8, 8)
    model(x, 5).sample.square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    model(x, 5).sample.square().mean().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(embed_dim=30, num_heads=4), "divisible by num_heads"),
        (dict(sample_size=9), "divisible by patch_size"),
        (dict(attention_type="linear"), "attention_type"),
        (dict(softmax_layers="middle"), "softmax_layers"),
        (dict(softmax_layers=[0, 99]), "out of range"),
        (dict(depth=5), "even"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_inputs_raise():
    model = tiny(num_classes=4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="class label out of range"):
        model(x, 1, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 4, 8, 8), 1)
    with pytest.raises(ValueError, match="built for 8x8"):
        model(torch.randn(2, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, 1, torch.tensor([0, 1]))
    # The null label (== num_classes) is valid: classifier-free guidance needs it.
    assert model(x, 1, torch.tensor([4, 4])).sample.shape == x.shape
