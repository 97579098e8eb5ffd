"""uvit_cog.official: released official checkpoints -> pipeline directories that sample as the official code does.

The tiny official fixtures (../shared/reference) stand in for the released checkpoints: each goes through the
converter with the recipe of a real config (its sampler, network time, guidance, latent scale) and its own
architecture, and the converted transformer must reproduce the official outputs at the official network time.
"""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_clip_text, tiny_vae_dir
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverSinglestepScheduler

from uvit_cog import UViTModel, UViTPipeline, UViTText2ImagePipeline, load_pipeline
from uvit_cog.model import official_kwargs
from uvit_cog.official import (
    OFFICIAL_CONFIGS,
    OFFICIAL_INFO,
    TIME_CONVENTIONS,
    convert_ldm_vae,
    convert_official,
    matching_configs,
    official_model_kwargs,
    read_official_info,
)

pytestmark = pytest.mark.usefixtures("single_thread")

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURES = torch.load(REFERENCE / "uvit_official_fixtures.pt", weights_only=True)
T2I_CASES = torch.load(REFERENCE / "uvit_t2i_fixtures.pt", weights_only=True)["cases"]
PRESETS = json.loads((REFERENCE / "uvit_official_presets.json").read_text())

# Parameter counts of the models the official configs build, counted with the official code itself (libs/uvit.py,
# libs/uvit_t2i.py at baofff/U-ViT ce55170; CogAttn's U-ViC/libs/uvit_t2i.py for np=True) on the meta device.
OFFICIAL_COUNTS = {
    "cifar10_uvit_small": 44_255_328, "celeba64_uvit_small": 44_292_228, "imagenet64_uvit_mid": 130_940_292,
    "imagenet64_uvit_large": 286_827_652, "imagenet256_uvit_large": 286_763_172,
    "imagenet256_uvit_huge": 500_832_016, "imagenet512_uvit_large": 286_861_524,
    "imagenet512_uvit_huge": 500_942_656, "mscoco_uvit_small": 44_692_644, "mscoco_uvit_small_deep": 58_345_636,
    "mscoco_uvit_small_np_0_last": 44_692_644,
}
# The entries of the shared reference presets (uvit_official_presets.json) that are released checkpoints.
PRESET_OF = {
    "cifar10_uvit_small": "cifar10 U-ViT-S/2 (uncond, 32x32x3)",
    "imagenet64_uvit_mid": "imagenet64 U-ViT-M/4 (1000 classes + null)",
    "imagenet64_uvit_large": "imagenet64 U-ViT-L/4 (1000 classes + null)",
    "imagenet256_uvit_large": "imagenet256 latent U-ViT-L/2 (32x32x4, 1000 classes + null)",
    "imagenet256_uvit_huge": "imagenet256 latent U-ViT-H/2 (32x32x4, 1000 classes + null, no final conv)",
}
# The tiny VAE of conftest.tiny_vae_dir, as the configuration of an LDM-layout file.
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
                       down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                       norm_num_groups=8, sample_size=16)


def meta_model(config) -> UViTModel:
    with torch.device("meta"):
        return UViTModel(**official_kwargs(official_model_kwargs(config)))


@pytest.mark.parametrize("name", list(OFFICIAL_CONFIGS))
def test_every_config_builds_the_official_model(name):
    config = OFFICIAL_CONFIGS[name]
    model = meta_model(config)
    count = sum(p.numel() for p in model.parameters())
    width = config.model["embed_dim"]
    # ImageNet-64's official label table has no null row (num_classes=1000): the converted model adds one.
    assert count == OFFICIAL_COUNTS[name] + (0 if config.null_class else width)
    assert model.config.num_classes == max(config.model.get("num_classes", -1) - config.null_class, 0)
    assert set(model.attention_types) == ({"softmax", "cog"} if config.model.get("np") else {"softmax"})
    time = TIME_CONVENTIONS[config.time]
    assert (model.config.timestep_offset, model.config.timestep_scale) == (time.timestep_offset, time.timestep_scale)
    reference = PRESETS.get(PRESET_OF.get(name))
    if reference is not None:  # the shared reference presets describe the same official model
        model_kwargs = {k: v for k, v in config.model.items() if k != "use_checkpoint"}
        # Its ImageNet-64 entries count 1001 classes (with a null class); the official configs build 1000.
        classes = model_kwargs["num_classes"] + (0 if config.null_class else 1)
        assert reference["config"] == {**model_kwargs, "num_classes": classes}
        assert count == reference["num_parameters"]


def test_guidance_and_latent_scale_of_the_released_checkpoints():
    """diffusers' g = 1 + s of the official scale s; the latent scale the training scripts used."""
    expected = {  # name: (official s, g, latent scale, official sampler, steps)
        "cifar10_uvit_small": (None, 1.0, None, "euler_maruyama_sde", 1000),
        "imagenet64_uvit_mid": (None, 1.0, None, "dpm_solver", 50),
        "imagenet256_uvit_large": (0.4, 1.4, 0.18215, "dpm_solver", 50),
        "imagenet256_uvit_huge": (0.4, 1.4, 0.18215, "dpm_solver_pp", 50),
        "imagenet512_uvit_huge": (0.7, 1.7, 0.18215, "dpm_solver_pp", 50),
        "mscoco_uvit_small": (1.0, 2.0, 0.23010, "dpm_solver_pp", 50),
        "mscoco_uvit_small_np_0_last": (1.0, 2.0, 0.23010, "dpm_solver_pp", 50),
    }
    for name, (s, g, latent, sampler, steps) in expected.items():
        c = OFFICIAL_CONFIGS[name]
        assert (c.scale, c.guidance_scale, c.latent_scale, c.sampler, c.steps) == (s, pytest.approx(g), latent,
                                                                                    sampler, steps), name


def test_matching_configs_names_the_configs_a_state_dict_fits():
    deep = meta_model(OFFICIAL_CONFIGS["mscoco_uvit_small_deep"]).state_dict()
    assert matching_configs(deep) == ["mscoco_uvit_small_deep"]
    small = meta_model(OFFICIAL_CONFIGS["mscoco_uvit_small"]).state_dict()
    assert matching_configs(small) == ["mscoco_uvit_small", "mscoco_uvit_small_np_0_last"]  # the same tensors
    imagenet64 = {k: v for k, v in meta_model(OFFICIAL_CONFIGS["imagenet64_uvit_mid"]).state_dict().items()}
    imagenet64["label_emb.weight"] = imagenet64["label_emb.weight"][:1000]  # the official table: no null row
    assert matching_configs(imagenet64) == ["imagenet64_uvit_mid"]


# ----------------------------------------------------------------------------------------------------------
# Noise schedules and network time


def test_discrete_schedule_is_the_official_one_indexed():
    """Official (train_t2i_discrete.py): betas = linspace(√0.00085, √0.012, 1000)², β₀ = 0 prepended, ᾱ_n the
    product over 1..n; the converted scheduler's ᾱ_t is ᾱ_n at t = n − 1 and the network sees t + 1 = n."""
    config = OFFICIAL_CONFIGS["mscoco_uvit_small"]
    from uvit_cog.official import official_scheduler

    scheduler = official_scheduler(config)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    official = torch.cumprod(1 - torch.cat([torch.zeros(1, dtype=torch.float64), betas]), 0)  # ᾱ_0..ᾱ_1000
    n = torch.arange(1, 1001)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), official[n], rtol=2e-6, atol=0)  # float32 product
    model = meta_model(config)
    assert (n - 1 + model.config.timestep_offset) * model.config.timestep_scale == pytest.approx(n.double())


def test_continuous_schedule_is_the_vp_sde_at_the_network_time():
    """Official (sde.py): ᾱ(s) = exp(−(0.1·s + 9.95·s²)) and the network sees 999·s; the converted scheduler's step
    t is s = (t + 1)/10000 and the network sees (t + 1)·0.0999 = 999·s."""
    config = OFFICIAL_CONFIGS["imagenet256_uvit_large"]
    from uvit_cog.official import official_scheduler

    scheduler = official_scheduler(config)
    t = torch.arange(10_000, dtype=torch.float64)
    s = (t + 1) / 10_000
    # 10,000 float32 factors: ~5e-6 relative at worst (measured 4.9e-6), so 2e-5.
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.exp(-(0.1 * s + 9.95 * s**2)), rtol=2e-5,
                               atol=0)
    model = meta_model(config)
    network = (t + model.config.timestep_offset) * model.config.timestep_scale
    torch.testing.assert_close(network, 999 * s, rtol=1e-12, atol=1e-9)


def test_default_schedulers_take_the_official_grids():
    # dpm_solver_pp (discrete): integer timesteps within 0.5 of the official t = linspace(1, 1/1000, 51)·1000 − 1,
    # ending at the official eps (diffusers' t = 0, `sigma_min`), not at zero noise.
    from uvit_cog.official import official_scheduler

    single = official_scheduler(OFFICIAL_CONFIGS["imagenet256_uvit_huge"])
    assert isinstance(single, DPMSolverSinglestepScheduler)
    single.set_timesteps(50)
    official = np.linspace(1.0, 1.0 / 1000, 51) * 1000 - 1
    assert np.abs(single.timesteps.numpy() - official[:-1]).max() <= 0.5 + 1e-9
    sigma_min = ((1 - single.alphas_cumprod[0]) / single.alphas_cumprod[0]) ** 0.5
    assert single.sigmas[-1] == pytest.approx(float(sigma_min))
    assert single.order_list == [1, 2, 3] * 16 + [1, 2]  # 16 third-order groups and a second-order one
    # dpm_solver (continuous): logSNR-uniform from s = 1 to the official eps s = 1e-4, then to zero noise.
    cont = official_scheduler(OFFICIAL_CONFIGS["imagenet64_uvit_mid"])
    cont.set_timesteps(50)
    assert cont.sigmas[-1] == 0
    lam = -torch.log(cont.sigmas[:-1].double())  # diffusers' sigma = σ/α = e^(−λ)
    assert torch.diff(lam).std() / torch.diff(lam).mean() < 1e-4
    s = np.array([1.0, 1e-4])
    log_alpha = -0.5 * (0.1 * s + 9.95 * s**2)
    official = log_alpha - 0.5 * np.log1p(-np.exp(2 * log_alpha))
    torch.testing.assert_close(lam[[0, -1]], torch.from_numpy(official), rtol=0, atol=5e-3)  # float32 ᾱ near 1
    # euler_maruyama_sde: DDPM on the Euler–Maruyama grid s = 1, 0.999, …, 0.001 (then to 0).
    ddpm = official_scheduler(OFFICIAL_CONFIGS["cifar10_uvit_small"])
    assert isinstance(ddpm, DDPMScheduler)
    ddpm.set_timesteps(1000)
    np.testing.assert_allclose((ddpm.timesteps.numpy() + 1) / 10_000, np.linspace(1e-3, 1, 1000)[::-1], atol=1e-12)


@pytest.mark.parametrize("name", ["cifar10_uvit_small", "imagenet64_uvit_mid", "imagenet256_uvit_huge"])
def test_every_sampler_built_from_a_converted_schedule_stays_finite(name):
    """sample.py builds its `scheduler=` from the saved config, which carries the default's settings (order 3,
    exponential sigmas, the final sigma): each sampler must still run 50 steps. Model: the exact ε of data
    N(0, 0.5²), x_t = α·x0 + σ·ε."""
    from uvit_cog.official import official_scheduler
    from uvit_cog.schedule import SCHEDULERS, make_scheduler

    saved = official_scheduler(OFFICIAL_CONFIGS[name]).config
    # kdpm2, heun and lms read none of these settings and take seconds to build on 10,000 steps (kdpm2: 6 s).
    for sampler in sorted(set(SCHEDULERS) - {"kdpm2", "heun", "lms"}):
        scheduler = make_scheduler(sampler, saved)
        scheduler.set_timesteps(50)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            xt = scheduler.scale_model_input(x, t)  # VP-space x_t for every sampler
            alpha_bar = float(scheduler.alphas_cumprod[int(round(float(t)))])
            eps = (1 - alpha_bar) ** 0.5 * xt / (0.25 * alpha_bar + 1 - alpha_bar)
            x = scheduler.step(eps, t, x).prev_sample
        assert torch.isfinite(x).all() and 0.2 < float(x.std()) < 1.0, (sampler, float(x.std()))


# ----------------------------------------------------------------------------------------------------------
# The fixtures through the converter


def diffusers_timestep(network_time: torch.Tensor, time: str) -> torch.Tensor:
    """diffusers' t at which the official network sees `network_time`, from the official code's definitions:
    discrete n = t + 1; continuous n = 999·s with the converted schedule's s = (t + 1)/10000."""
    n = network_time.double()
    return n - 1 if time == "discrete" else n / 999 * 10_000 - 1


def as_config(name, official_kwargs_, **changes):
    """The recipe of official config `name` with the architecture of a tiny fixture."""
    return dataclasses.replace(OFFICIAL_CONFIGS[name], model=official_kwargs_, **changes)


def save_checkpoint(state_dict, path):
    torch.save(dict(state_dict), path)
    return path


@pytest.mark.parametrize("case", T2I_CASES, ids=[c["name"] for c in T2I_CASES])
def test_text_to_image_fixtures_convert_and_reproduce_the_official_outputs(case, tmp_path):
    """MS-COCO recipe: the network time of diffusers' t is t + 1, so the fixture's official n is t = n − 1."""
    name = "mscoco_uvit_small_np_0_last" if case["official_kwargs"].get("np") else "mscoco_uvit_small"
    config = as_config(name, case["official_kwargs"])
    checkpoint = save_checkpoint(case["state_dict"], tmp_path / "model.pth")
    text = save_tiny_clip_text(tmp_path / "clip", hidden_size=case["official_kwargs"]["clip_dim"])
    out = convert_official(checkpoint, config, tmp_path / "converted", vae=tiny_vae_dir(tmp_path / "vae"),
                           text_encoder=text)
    pipe = load_pipeline(out)
    assert isinstance(pipe, UViTText2ImagePipeline) and isinstance(pipe.scheduler, DPMSolverSinglestepScheduler)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.23010)
    assert pipe.transformer.attention_types == case["expected_attention_types"]
    with torch.no_grad():
        out_t = pipe.transformer(case["x"], diffusers_timestep(case["timesteps"], "discrete"),
                                 encoder_hidden_states=case["context"]).sample
    # float32 rounding between machines (the fixture's own f32 vs f64 differ by ~4e-7 relative): 1e-5.
    torch.testing.assert_close(out_t, case["out_f32"], rtol=1e-5, atol=1e-5)
    info = read_official_info(out)
    assert info["guidance_scale"] == 2.0 and info["official_guidance_scale"] == 1.0
    assert info["num_inference_steps"] == 50 and info["latent_scale_factor"] == pytest.approx(0.23010)
    assert info["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert info["network_time"]["timestep_offset"] == 1
    # End to end: prompts through the tiny CLIP, guidance, the saved DPM-Solver++, the VAE.
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red bus", "two zebras"], num_inference_steps=5, guidance_scale=info["guidance_scale"],
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("name", ["imagenet256_uvit_huge", "imagenet256_uvit_large"])
def test_class_conditional_fixture_converts_with_each_time_convention(name, tmp_path):
    """Fixture 1 (latent, 10 classes + null, no final conv) with the discrete (H/2) and the continuous (L/2) recipe:
    discrete n = t + 1; continuous n = 999·s = (t + 1)·0.0999, i.e. t = n/0.0999 − 1."""
    fixture = FIXTURES[1]
    config = as_config(name, fixture["config"])
    out = convert_official(save_checkpoint(fixture["state_dict"], tmp_path / "model.pth"), config,
                           tmp_path / "converted", vae=tiny_vae_dir(tmp_path / "vae"))
    pipe = load_pipeline(out)
    assert isinstance(pipe, UViTPipeline) and pipe.num_classes == 10
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    t = diffusers_timestep(fixture["timesteps"], config.time)
    with torch.no_grad():
        out_t = pipe.transformer(fixture["x"], t, fixture["y"]).sample
    torch.testing.assert_close(out_t, fixture["out_softmax"], rtol=1e-5, atol=1e-5)
    assert read_official_info(out)["guidance_scale"] == pytest.approx(1.4)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3, 7], num_inference_steps=4, guidance_scale=1.4, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_unconditional_pixel_fixture_converts_with_the_sde_recipe(tmp_path):
    """Fixture 0 as CIFAR-10: pixel space (no VAE), continuous time, DDPM on the Euler–Maruyama grid."""
    fixture = FIXTURES[0]
    out = convert_official(save_checkpoint(fixture["state_dict"], tmp_path / "model.pth"),
                           as_config("cifar10_uvit_small", fixture["config"]), tmp_path / "converted")
    pipe = load_pipeline(out)
    assert pipe.vae is None and isinstance(pipe.scheduler, DDPMScheduler) and pipe.num_classes == 0
    t = diffusers_timestep(fixture["timesteps"], "continuous")
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(fixture["x"], t).sample, fixture["out_softmax"], rtol=1e-5,
                                   atol=1e-5)
    info = read_official_info(out)
    assert info["num_inference_steps"] == 1000 and info["guidance_scale"] == 1.0 and info["latent_scale_factor"] is None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, 8, 8, 3)


def test_a_label_table_without_null_class_gets_an_untrained_null_row(tmp_path):
    """ImageNet-64 recipe (num_classes counts only real classes): fixture 1's 11 label rows read as 11 classes."""
    fixture = FIXTURES[1]
    kwargs = {**fixture["config"], "num_classes": 11}
    out = convert_official(save_checkpoint(fixture["state_dict"], tmp_path / "model.pth"),
                           as_config("imagenet64_uvit_mid", kwargs), tmp_path / "converted")
    pipe = load_pipeline(out)
    assert pipe.num_classes == 11
    table = pipe.transformer.label_emb.weight
    torch.testing.assert_close(table[:11], fixture["state_dict"]["label_emb.weight"], rtol=0, atol=0)
    assert not table[11].any()
    t = diffusers_timestep(fixture["timesteps"], "continuous")
    with torch.no_grad():  # the real classes give the official outputs
        torch.testing.assert_close(pipe.transformer(fixture["x"], t, fixture["y"]).sample, fixture["out_softmax"],
                                   rtol=1e-5, atol=1e-5)
    info = read_official_info(out)
    assert info["null_class_trained"] is False and info["guidance_scale"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# The autoencoder in U-ViT's LDM layout


def to_ldm_layout(state_dict: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout of U-ViT's libs/autoencoder.py (`encoder.down.{i}.
    block.{j}`, `downsample`, `mid.block_{1,2}`, `mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convolutions,
    `norm_out`, `nin_shortcut`; the decoder's `up.{i}` counted from the lowest resolution), written from that
    layout, independently of diffusers' own key map."""
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"conv_shortcut", "nin_shortcut"),
    ]
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", new)
        if up:
            level = num_levels - 1 - int(up.group(1))
            new = f"decoder.up.{level}." + ("block." if up.group(2) == "resnets" else "upsample.") + up.group(3)
        if ".mid.attn_1." in new and new.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[new] = value
    return out


def random_tiny_vae(path: Path) -> AutoencoderKL:
    """conftest's tiny VAE with every tensor random (norm scales too), so a wrong mapping cannot hide."""
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir(path))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return vae.eval()


def test_ldm_layout_vae_converts_to_the_same_autoencoder(tmp_path):
    original = random_tiny_vae(tmp_path / "vae")
    ldm = to_ldm_layout(original.state_dict(), num_levels=2)
    assert set(ldm) >= {"encoder.down.0.block.0.conv1.weight", "decoder.up.1.upsample.conv.weight",
                        "encoder.mid.attn_1.q.weight", "decoder.mid.block_2.norm1.bias", "post_quant_conv.weight"}
    converted = convert_ldm_vae(ldm, TINY_VAE_CONFIG, scaling_factor=0.23010)
    assert converted.config.scaling_factor == pytest.approx(0.23010)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0, msg=key)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(converted.decode(z).sample, original.decode(z).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LDM-layout"):
        convert_ldm_vae({k: v for k, v in ldm.items() if "mid.attn_1" not in k}, TINY_VAE_CONFIG)


def test_converter_takes_an_ldm_layout_vae_file_with_the_checkpoint_scale(tmp_path):
    case = T2I_CASES[0]
    original = random_tiny_vae(tmp_path / "vae")
    vae_file = tmp_path / "autoencoder_kl.pth"
    torch.save(to_ldm_layout(original.state_dict(), num_levels=2), vae_file)
    out = convert_official(save_checkpoint(case["state_dict"], tmp_path / "model.pth"),
                           as_config("mscoco_uvit_small", case["official_kwargs"]), tmp_path / "converted",
                           vae=vae_file, text_encoder=save_tiny_clip_text(tmp_path / "clip", hidden_size=16),
                           vae_config=TINY_VAE_CONFIG)
    pipe = load_pipeline(out)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the pipeline decodes z / 0.23010, as U-ViT's FrozenAutoencoderKL.decode
        expected = (original.decode(z / 0.23010).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(pipe.decode_latents(z), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Errors, before anything is written


class NotAStateDict:
    """A pickled object: a weights-only load must refuse it."""


def test_errors_are_raised_before_anything_is_written(tmp_path):
    case = T2I_CASES[0]
    checkpoint = save_checkpoint(case["state_dict"], tmp_path / "model.pth")
    config = as_config("mscoco_uvit_small", case["official_kwargs"])
    text = save_tiny_clip_text(tmp_path / "clip", hidden_size=16)
    vae = tiny_vae_dir(tmp_path / "vae")

    with pytest.raises(ValueError, match="unknown official config 'mscoco'.*mscoco_uvit_small_deep"):
        convert_official(checkpoint, "mscoco", tmp_path / "a")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_official(checkpoint, config, used, vae=vae, text_encoder=text)
    assert (used / "keep.txt").read_text() == "mine" and len(list(used.iterdir())) == 1
    with pytest.raises(ValueError, match="latent model: give vae"):
        convert_official(checkpoint, config, tmp_path / "b", text_encoder=text)
    with pytest.raises(ValueError, match="pixel-space model: it takes no vae"):
        convert_official(checkpoint, as_config("cifar10_uvit_small", FIXTURES[0]["config"]), tmp_path / "b", vae=vae)
    with pytest.raises(ValueError, match="not text-conditional"):
        convert_official(checkpoint, as_config("imagenet256_uvit_huge", FIXTURES[1]["config"]), tmp_path / "b",
                         vae=vae, text_encoder=text)
    # The real config: the tiny checkpoint does not fit it, and fits no official config.
    with pytest.raises(ValueError, match=r"does not fit U-ViT-S/2, MS-COCO.*missing.*fits no official config"):
        convert_official(checkpoint, "mscoco_uvit_small", tmp_path / "b", vae=vae, text_encoder=text)
    deeper = {**case["official_kwargs"], "depth": 4}
    with pytest.raises(ValueError, match="does not fit"):
        convert_official(checkpoint, as_config("mscoco_uvit_small", deeper), tmp_path / "b", vae=vae,
                         text_encoder=text)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": NotAStateDict()}, pickled)
    with pytest.raises(ValueError, match="cannot be read as weights only"):
        convert_official(pickled, config, tmp_path / "b", vae=vae, text_encoder=text)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="not a state dict"):
        convert_official(listed, config, tmp_path / "b", vae=vae, text_encoder=text)
    wide = save_tiny_clip_text(tmp_path / "clip32", hidden_size=32)  # fails while building the pipeline
    with pytest.raises(ValueError, match="width 32"):
        convert_official(checkpoint, config, tmp_path / "b", vae=vae, text_encoder=wide)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".tmp_*"))
    # An empty out_dir is fine.
    (tmp_path / "empty").mkdir()
    assert (convert_official(checkpoint, config, tmp_path / "empty", vae=vae, text_encoder=text) / OFFICIAL_INFO
            ).is_file()


def test_the_script_lists_configs_and_reports_errors(tmp_path, capsys):
    from conftest import load_script

    script = load_script("convert_official")
    assert script.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in OFFICIAL_CONFIGS) and "g = 2.0" in listing
    with pytest.raises(SystemExit):
        script.main(["--config", "nope", "--checkpoint", "x.pth", "--out", str(tmp_path / "o")])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--config", "mscoco_uvit_small"])
    assert "--checkpoint" in capsys.readouterr().err
    # The whole path up to the model: a tiny checkpoint is no released MS-COCO model.
    checkpoint = save_checkpoint(T2I_CASES[0]["state_dict"], tmp_path / "model.pth")
    code = script.main(["--config", "mscoco_uvit_small", "--checkpoint", str(checkpoint), "--out",
                        str(tmp_path / "o"), "--vae", str(tiny_vae_dir(tmp_path / "vae"))])
    assert code == 1 and "does not fit" in capsys.readouterr().err and not (tmp_path / "o").exists()
