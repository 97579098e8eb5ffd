"""The released official U-ViT / U-ViC checkpoints, described once as data: what each official config builds, how the
official code turns its training time into the network's time input, the official sampler and guidance, pixel or
latent space with the autoencoder's scale factor; and `official_kwargs`, the official constructor's arguments as
`UViTModel`'s. Converting a checkpoint into a pipeline directory is `uvit_cog.official`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The official constructor's argument names -> this model's. Any of them (or CogAttn's `np`) marks official kwargs.
OFFICIAL_NAMES = {"img_size": "sample_size", "in_chans": "in_channels", "conv": "final_conv", "clip_dim": "text_dim",
                  "num_clip_token": "num_text_tokens"}
# Official arguments with no counterpart here: they change nothing the weights or the outputs depend on.
OFFICIAL_IGNORED = ("qk_scale", "use_checkpoint", "skip", "norm_layer", "name")


def official_kwargs(config: Mapping) -> dict:
    """`UViTModel` arguments of an official U-ViT / U-ViC constructor config (or of this model's own arguments).

    Renames official arguments (`OFFICIAL_NAMES`), counts `num_classes` without the null class when the config
    is official (the official count includes it; -1 there means unconditional), and sets the official attention
    unless `attention_type` is given: softmax everywhere, or with CogAttn's `np=True` Cog in every block but
    the first in-block and the last out-block.
    """
    config = dict(config)
    is_official = "np" in config or any(key in config for key in OFFICIAL_NAMES)
    cog = bool(config.pop("np", False))
    for old, new in OFFICIAL_NAMES.items():
        if old in config:
            config[new] = config.pop(old)
    for key in OFFICIAL_IGNORED:
        config.pop(key, None)
    if is_official and "num_classes" in config:
        config["num_classes"] = max(int(config["num_classes"]) - 1, 0)
    if "attention_type" not in config:
        config["attention_type"] = "cog" if cog else "softmax"
        config.setdefault("softmax_layers", "first_last" if cog else "all")
    return config


# ----------------------------------------------------------------------------------------------------------
# How the official code schedules noise and feeds time to the network


@dataclass(frozen=True)
class TimeConvention:
    """A noise schedule as diffusers' discrete timesteps t, and the network time (t + offset) · scale that the
    official model was trained to see at the noise level of t."""

    description: str
    num_train_timesteps: int
    timestep_offset: float
    timestep_scale: float
    schedule: str  # "scaled_linear" (a uvit_cog.schedule.NOISE_SCHEDULES name) or "vp_sde" (`vp_sde_betas`)


# U-ViT's continuous VP SDE (sde.VPSDE, and dpm_solver_pytorch.NoiseScheduleVP('linear')): β(s) = 0.1 + 19.9·s.
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0
# Steps of the diffusers schedule that stands for it: s = (t + 1)/T reaches the official samplers' s = 1e-4
# (DPM-Solver's eps) and, every 10th step, Euler–Maruyama's grid s = 0.001, 0.002, …, 1.
VP_SDE_STEPS = 10_000

TIME_CONVENTIONS: dict[str, TimeConvention] = {
    "discrete": TimeConvention(
        "Stable Diffusion's betas (scaled_linear, 1,000 steps); the official network time is the 1-indexed "
        "n = t + 1 (train_ldm_discrete.py / train_t2i_discrete.py train on n in 1..1000, where ᾱ_n is "
        "diffusers' ᾱ_t for t = n - 1)",
        num_train_timesteps=1000, timestep_offset=1, timestep_scale=1.0, schedule="scaled_linear"),
    "continuous": TimeConvention(
        "the VP SDE β(s) = 0.1 + 19.9·s, s in (0, 1] (sde.py); the official network time is 999·s "
        f"(ScoreModel.predict); diffusers' step t is s = (t + 1)/{VP_SDE_STEPS}, so the network sees "
        f"(t + 1)·999/{VP_SDE_STEPS}",
        num_train_timesteps=VP_SDE_STEPS, timestep_offset=1, timestep_scale=999 / VP_SDE_STEPS, schedule="vp_sde"),
}


def vp_sde_betas(num_train_timesteps: int = VP_SDE_STEPS) -> list[float]:
    """The betas whose ᾱ_t is the VP SDE's exp(−∫₀ˢ β) at s = (t + 1)/T exactly (computed in float64)."""
    s = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    log_alpha_bar = -(VP_BETA_MIN * s + 0.5 * (VP_BETA_MAX - VP_BETA_MIN) * s**2)
    return (-np.expm1(np.diff(log_alpha_bar, prepend=0.0))).tolist()


@dataclass(frozen=True)
class OfficialSampler:
    """An official sampler and the diffusers scheduler (a `uvit_cog.schedule.SCHEDULERS` name and its settings)
    that comes closest to it, measured in docs/official_checkpoints.md."""

    description: str
    scheduler: str
    settings: Mapping[str, Any] = field(default_factory=dict)


# The closest diffusers schedulers, chosen by measurement (docs/official_checkpoints.md, "How close"): on the
# discrete schedule, DPMSolverSinglestepScheduler's third-order groups take the same steps as the official
# 'fast' method (its first-order step and its final third-order update are the official formulas; its
# second-order step to the group's third point is the midpoint form where DPM-Solver-3 uses its own), on integer
# timesteps rounded from the official time-uniform grid, ending at the official t = 1/1000 (`sigma_min`). On the
# continuous schedule, exponential sigmas make its steps logSNR-uniform, as the official fast version's, from
# s = 1 to the official s = 1e-4, then one step to zero noise ("zero": with `sigma_min` the last sigma would repeat
# and a multistep solver built from this config, e.g. sample.py's default dpm_solver, would divide by zero).
_SINGLESTEP_O3 = dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="midpoint", lower_order_final=True)

OFFICIAL_SAMPLERS: dict[str, OfficialSampler] = {
    "dpm_solver_pp": OfficialSampler(
        "U-ViT's dpm_solver_pp.py: DPM-Solver++ (data prediction), method 'fast' = singlestep, third order "
        "(16 third-order steps and one second-order step for 50 evaluations), time-uniform steps from t = 1 to "
        "1/1000, the network fed 1000·t, no final denoising",
        scheduler="dpm_solver_single",
        settings={**_SINGLESTEP_O3, "use_exponential_sigmas": False, "final_sigmas_type": "sigma_min"},
    ),
    "dpm_solver": OfficialSampler(
        "U-ViT's dpm_solver_pytorch.py: DPM-Solver (noise prediction), fast version: 17 logSNR-uniform steps "
        "from s = 1 to 1e-4 (16 third-order singlestep steps and one second-order step for 50 evaluations), no "
        "final denoising",
        scheduler="dpm_solver_single",
        settings={**_SINGLESTEP_O3, "use_exponential_sigmas": True, "final_sigmas_type": "zero"},
    ),
    "euler_maruyama_sde": OfficialSampler(
        "U-ViT's sde.py: Euler–Maruyama on the reverse VP SDE, 1,000 steps over s = 1, 0.999, …, 0.001, then a "
        "last step to s = 0 without noise",
        scheduler="ddpm", settings={},  # ancestral sampling on the same grid: every 10th step of the 10,000
    ),
}


# ----------------------------------------------------------------------------------------------------------
# The released checkpoints


# U-ViT's copy of Stable Diffusion's autoencoder (libs/autoencoder.get_model: ch 128, ch_mult 1,2,4,4, two
# residual blocks per level, attention in the middle block only, 4 latent channels) as diffusers' AutoencoderKL.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
    act_fn="silu", sample_size=256,
)


@dataclass(frozen=True)
class OfficialConfig:
    """One released checkpoint: what its official config builds and how the official code samples it.

    `model` holds the constructor arguments as the official config passes them (`config.nnet` without `name`).
    `scale` is the official guidance s in ε_c + s·(ε_c − ε_u) (None: the official evaluation uses no guidance);
    diffusers' g = 1 + s (`guidance_scale`). `latent_scale` is the factor the latents were multiplied by (None:
    pixel space) and `vae_file` the autoencoder U-ViT's evaluation decodes with. `null_class` is False where the
    official label table has no null class (ImageNet-64: num_classes=1000, trained without label dropout).
    """

    description: str
    source: str
    checkpoint: str
    model: Mapping[str, Any]
    time: str
    sampler: str
    steps: int
    scale: float | None
    fid: str
    latent_scale: float | None = None
    vae_file: str | None = None
    null_class: bool = True

    @property
    def guidance_scale(self) -> float:
        """The official guidance in diffusers' convention: g = 1 + s (1.0: no guidance)."""
        return 1.0 + (self.scale or 0.0)

    @property
    def text(self) -> bool:
        """Whether the model is text-conditional (the MS-COCO models)."""
        return "clip_dim" in self.model


_S2 = dict(patch_size=2, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_MID = dict(embed_dim=768, depth=16, num_heads=12, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_LARGE = dict(embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_HUGE = dict(embed_dim=1152, depth=28, num_heads=16, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_COCO = dict(img_size=32, in_chans=4, **_S2, clip_dim=768, num_clip_token=77)
_UVIT = "baofff/U-ViT configs/"
_COCO_SAMPLING = dict(time="discrete", sampler="dpm_solver_pp", steps=50, scale=1.0, latent_scale=0.23010,
                      vae_file="autoencoder_kl.pth")

OFFICIAL_CONFIGS: dict[str, OfficialConfig] = {
    "cifar10_uvit_small": OfficialConfig(
        "U-ViT-S/2, CIFAR-10 32x32, unconditional", _UVIT + "cifar10_uvit_small.py", "cifar10_uvit_small.pth",
        dict(img_size=32, **_S2, num_classes=-1), "continuous", "euler_maruyama_sde", 1000, None, "3.11"),
    "celeba64_uvit_small": OfficialConfig(
        "U-ViT-S/4, CelebA 64x64, unconditional", _UVIT + "celeba64_uvit_small.py", "celeba64_uvit_small.pth",
        dict(img_size=64, **{**_S2, "patch_size": 4}, num_classes=-1), "continuous", "euler_maruyama_sde", 1000,
        None, "2.87"),
    "imagenet64_uvit_mid": OfficialConfig(
        "U-ViT-M/4, ImageNet 64x64, class-conditional (no guidance)", _UVIT + "imagenet64_uvit_mid.py",
        "imagenet64_uvit_mid.pth", dict(img_size=64, patch_size=4, **_MID, num_classes=1000), "continuous",
        "dpm_solver", 50, None, "5.85", null_class=False),
    "imagenet64_uvit_large": OfficialConfig(
        "U-ViT-L/4, ImageNet 64x64, class-conditional (no guidance)", _UVIT + "imagenet64_uvit_large.py",
        "imagenet64_uvit_large.pth", dict(img_size=64, patch_size=4, **_LARGE, num_classes=1000), "continuous",
        "dpm_solver", 50, None, "4.26", null_class=False),
    "imagenet256_uvit_large": OfficialConfig(
        "U-ViT-L/2, ImageNet 256x256 (32x32x4 latents), class-conditional", _UVIT + "imagenet256_uvit_large.py",
        "imagenet256_uvit_large.pth", dict(img_size=32, patch_size=2, in_chans=4, **_LARGE, num_classes=1001),
        "continuous", "dpm_solver", 50, 0.4, "3.40", latent_scale=0.18215, vae_file="autoencoder_kl.pth"),
    "imagenet256_uvit_huge": OfficialConfig(
        "U-ViT-H/2, ImageNet 256x256 (32x32x4 latents), class-conditional", _UVIT + "imagenet256_uvit_huge.py",
        "imagenet256_uvit_huge.pth",
        dict(img_size=32, patch_size=2, in_chans=4, **_HUGE, num_classes=1001, conv=False),
        "discrete", "dpm_solver_pp", 50, 0.4, "2.29", latent_scale=0.18215, vae_file="autoencoder_kl_ema.pth"),
    "imagenet512_uvit_large": OfficialConfig(
        "U-ViT-L/4, ImageNet 512x512 (64x64x4 latents), class-conditional", _UVIT + "imagenet512_uvit_large.py",
        "imagenet512_uvit_large.pth", dict(img_size=64, patch_size=4, in_chans=4, **_LARGE, num_classes=1001),
        "continuous", "dpm_solver", 50, 0.7, "4.67", latent_scale=0.18215, vae_file="autoencoder_kl.pth"),
    "imagenet512_uvit_huge": OfficialConfig(
        "U-ViT-H/4, ImageNet 512x512 (64x64x4 latents), class-conditional", _UVIT + "imagenet512_uvit_huge.py",
        "imagenet512_uvit_huge.pth",
        dict(img_size=64, patch_size=4, in_chans=4, **_HUGE, num_classes=1001, conv=False),
        "discrete", "dpm_solver_pp", 50, 0.7, "4.05", latent_scale=0.18215, vae_file="autoencoder_kl_ema.pth"),
    "mscoco_uvit_small": OfficialConfig(
        "U-ViT-S/2, MS-COCO 256x256 text-to-image (also CogAttn's U-ViT-S/2 retrain)", _UVIT + "mscoco_uvit_small.py",
        "mscoco_uvit_small.pth", _COCO, fid="5.95 (CogAttn's retrain: 5.996 at 850k steps)", **_COCO_SAMPLING),
    "mscoco_uvit_small_deep": OfficialConfig(
        "U-ViT-S/2-Deep (depth 16), MS-COCO 256x256 text-to-image",
        _UVIT + "mscoco_uvit_small.py with --config.nnet.depth=16", "mscoco_uvit_small_deep.pth",
        {**_COCO, "depth": 16}, fid="5.48", **_COCO_SAMPLING),
    "mscoco_uvit_small_np_0_last": OfficialConfig(
        "U-ViC-S/2 (Cog attention in every block but the first and the last), MS-COCO 256x256 text-to-image",
        "trestad/CogAttn U-ViC/configs/mscoco_uvit_small_np_0_last.py", "U-ViC-S/2 MS-COCO (CogAttn README)",
        {**_COCO, "np": True}, fid="5.855 at 900k steps (CogAttn's log)", **_COCO_SAMPLING),
}


def get_official_config(name: str) -> OfficialConfig:
    """The released checkpoint described by official config `name`; a ValueError lists the known names."""
    if name not in OFFICIAL_CONFIGS:
        raise ValueError(f"unknown official config {name!r}; known configs: {', '.join(OFFICIAL_CONFIGS)}")
    return OFFICIAL_CONFIGS[name]


__all__ = ["OFFICIAL_CONFIGS", "OFFICIAL_IGNORED", "OFFICIAL_NAMES", "OFFICIAL_SAMPLERS", "SD_VAE_CONFIG",
           "TIME_CONVENTIONS", "OfficialConfig", "OfficialSampler", "TimeConvention", "get_official_config",
           "official_kwargs", "vp_sde_betas"]
