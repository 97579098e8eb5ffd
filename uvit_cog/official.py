"""From a released official U-ViT / U-ViC checkpoint to a pipeline directory that samples as the official code does.

Every released checkpoint is described once, as data, in `OFFICIAL_CONFIGS` (by the name of its official config:
`configs/<name>.py` in baofff/U-ViT, `U-ViC/configs/<name>.py` in trestad/CogAttn): the constructor arguments
the official config passes, how the official code turns its training time into the network's time input, the
official sampler and guidance, and pixel or latent space with the autoencoder's scale factor. `convert_official`
reads such a checkpoint (weights only), builds the model the official code builds (`UViTModel.
from_official_state_dict`), and writes a `UViTPipeline` / `UViTText2ImagePipeline` directory with

- the official network time: the model sees (t + `timestep_offset`) · `timestep_scale` for diffusers' timestep t
  (`TIME_CONVENTIONS`). U-ViT's discrete models (MS-COCO, ImageNet H/2 and H/4) were trained on the 1-indexed
  n = t + 1 of Stable Diffusion's betas; its continuous-time models (CIFAR-10, CelebA, ImageNet-64, ImageNet
  L/2 and L/4) on 999·s for s ∈ (0, 1] of the VP SDE β(s) = 0.1 + 19.9·s, written here as a 10,000-step schedule
  whose step t is s = (t + 1)/10,000 exactly (its betas are the SDE's own, so every ᾱ is exact);
- the autoencoder with the scale factor the model's latents were made with (0.23010 for the MS-COCO models,
  Stable Diffusion's 0.18215 for the ImageNet ones: their training scripts keep `libs/autoencoder.get_model`'s
  default), converted from U-ViT's `autoencoder_kl*.pth` (LDM layout) or read from a diffusers folder;
- the text encoder of the MS-COCO models (CLIP ViT-L/14's text model, `uvit_cog.text`);
- as its saved scheduler the diffusers scheduler closest to the official sampler (`OFFICIAL_SAMPLERS`; how close
  is measured in docs/official_checkpoints.md);
- `official.json` beside model_index.json: the source (config name, checkpoint SHA-256) and the recommended
  sampling (steps, guidance in diffusers' convention g = 1 + s), read back by `read_official_info`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model import UViTModel, official_kwargs
from .pipeline import UViTPipeline, UViTText2ImagePipeline
from .rundir import TMP_PREFIX
from .schedule import make_scheduler, scheduler_config
from .text import CLIP_L14, load_text_encoder

OFFICIAL_INFO = "official.json"  # written beside model_index.json


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


# ----------------------------------------------------------------------------------------------------------
# Building the pieces


def official_model_kwargs(config: OfficialConfig) -> dict[str, Any]:
    """The `from_official_state_dict` arguments of a config: its official kwargs plus its network time (and one
    null class where the official table has none, see `official_state_dict`)."""
    time = TIME_CONVENTIONS[config.time]
    kwargs = {k: v for k, v in config.model.items() if k != "use_checkpoint"}
    if not config.null_class:
        kwargs["num_classes"] = int(kwargs["num_classes"]) + 1
    return {**kwargs, "timestep_offset": time.timestep_offset, "timestep_scale": time.timestep_scale}


def official_state_dict(state_dict: Mapping[str, Tensor], config: OfficialConfig) -> dict[str, Tensor]:
    """The checkpoint's tensors as `UViTModel` takes them: where the official label table has no null class
    (ImageNet-64), a zero row is appended as the null label. That row was never trained: such a model samples
    class-conditionally without guidance only, as the official evaluation does."""
    state_dict = dict(state_dict)
    if not config.null_class and "label_emb.weight" in state_dict:
        table = state_dict["label_emb.weight"]
        state_dict["label_emb.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return state_dict


def build_official_model(state_dict: Mapping[str, Tensor], config: OfficialConfig) -> UViTModel:
    """The `UViTModel` the official config builds, holding the checkpoint's weights, at the official network time."""
    return UViTModel.from_official_state_dict(official_state_dict(state_dict, config), **official_model_kwargs(config))


def official_scheduler_config(config: OfficialConfig) -> dict[str, Any]:
    """The complete noise-schedule config (every value explicit) of a config's network time."""
    time = TIME_CONVENTIONS[config.time]
    if time.schedule == "vp_sde":
        # The SDE's own betas; beta_start/end restate its endpoints (ignored by diffusers when trained_betas is set).
        betas = vp_sde_betas(time.num_train_timesteps)
        out = scheduler_config("linear", "epsilon", num_train_timesteps=time.num_train_timesteps)
        return {**out, "beta_start": betas[0], "beta_end": betas[-1], "trained_betas": betas}
    return {**scheduler_config(time.schedule, "epsilon", num_train_timesteps=time.num_train_timesteps),
            "trained_betas": None}


def official_scheduler(config: OfficialConfig) -> SchedulerMixin:
    """The diffusers scheduler closest to the config's official sampler, on the config's noise schedule."""
    sampler = OFFICIAL_SAMPLERS[config.sampler]
    return make_scheduler(sampler.scheduler, {**official_scheduler_config(config), **sampler.settings})


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a `.pth`/`.ckpt` (read with `torch.load(weights_only=True)`: no code runs) or a
    `.safetensors` file; a ValueError if the file holds anything but a flat mapping of names to tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle or a damaged file: say which, never retry unsafely
        raise ValueError(f"{path} cannot be read as weights only ({type(e).__name__}: {e}); it must be a state "
                         "dict of tensors saved with torch.save, as the official code saves them") from e
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict (a mapping of names to tensors)")
    return dict(data)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def convert_ldm_vae(state_dict: Mapping[str, Tensor], vae_config: Mapping[str, Any] = SD_VAE_CONFIG,
                    scaling_factor: float = 0.18215) -> AutoencoderKL:
    """An `AutoencoderKL` from an LDM-layout autoencoder state dict (U-ViT's `autoencoder_kl.pth`: `encoder.*`,
    `decoder.*`, `quant_conv`, `post_quant_conv`) through diffusers' own key map; every tensor must be used."""
    converted = convert_ldm_vae_checkpoint(dict(state_dict), dict(vae_config))
    vae = AutoencoderKL(**{**vae_config, "scaling_factor": scaling_factor})
    missing = sorted(set(vae.state_dict()) - set(converted))
    if missing or len(converted) != len(state_dict):
        raise ValueError(f"the autoencoder state dict is not an LDM-layout AutoencoderKL of this configuration "
                         f"({len(state_dict)} tensors, {len(converted)} converted; diffusers tensors missing: "
                         f"{missing[:5]}); U-ViT's autoencoder_kl.pth / autoencoder_kl_ema.pth are")
    wrong = [(k, tuple(v.shape), tuple(vae.state_dict()[k].shape)) for k, v in converted.items()
             if k in vae.state_dict() and v.shape != vae.state_dict()[k].shape]
    if wrong or set(converted) - set(vae.state_dict()):
        raise ValueError(f"autoencoder tensors do not fit the configuration (name, file, config): {wrong[:5]}")
    vae.load_state_dict(converted)
    return vae.eval()


def load_vae(source: str | os.PathLike | AutoencoderKL, scaling_factor: float,
             vae_config: Mapping[str, Any] = SD_VAE_CONFIG) -> AutoencoderKL:
    """The autoencoder of a latent model with the model's `scaling_factor`: an `AutoencoderKL`, a diffusers folder
    (an AutoencoderKL's, or a pipeline's with `vae/`; safetensors only) or U-ViT's LDM-layout `.pth` file."""
    if isinstance(source, AutoencoderKL):
        vae = source
    elif Path(source).is_dir():
        sub = {"subfolder": "vae"} if (Path(source) / "vae").is_dir() else {}
        vae = AutoencoderKL.from_pretrained(source, use_safetensors=True, **sub)
    elif Path(source).is_file():
        return convert_ldm_vae(load_weights(source), vae_config, scaling_factor)
    else:
        raise FileNotFoundError(f"vae {str(source)!r} is neither a diffusers AutoencoderKL folder nor a file")
    # U-ViT's latents are scale·z with no shift (libs/autoencoder.FrozenAutoencoderKL).
    vae.register_to_config(scaling_factor=float(scaling_factor), shift_factor=None)
    return vae.eval()


# ----------------------------------------------------------------------------------------------------------
# The converter


TextEncoderSource = str | os.PathLike | tuple[PreTrainedModel, PreTrainedTokenizerBase]


def _check_arguments(config: OfficialConfig, out_dir: Path, vae: object, text_encoder: object) -> None:
    """Every argument error of `convert_official` that can be seen before reading the checkpoint."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir {str(out_dir)!r} exists and is not an empty directory: give a new path "
                              "(nothing is overwritten)")
    if config.latent_scale is not None and vae is None:
        raise ValueError(f"{config.description} is a latent model: give vae, U-ViT's {config.vae_file} (LDM layout) "
                         "or a diffusers AutoencoderKL folder of Stable Diffusion's autoencoder")
    if config.latent_scale is None and vae is not None:
        raise ValueError(f"{config.description} is a pixel-space model: it takes no vae")
    if not config.text and text_encoder is not None:
        raise ValueError(f"{config.description} is not text-conditional: it takes no text_encoder")


def _load_text_encoder(source: TextEncoderSource) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(source, tuple):
        return source
    # A diffusers pipeline folder keeps the encoder in text_encoder/ and the tokenizer in tokenizer/.
    sub = "text_encoder" if (Path(source) / "text_encoder").is_dir() else None
    return load_text_encoder(source, subfolder=sub)


def convert_official(
    checkpoint: str | os.PathLike,
    config: str | OfficialConfig,
    out_dir: str | os.PathLike,
    vae: str | os.PathLike | AutoencoderKL | None = None,
    text_encoder: TextEncoderSource | None = None,
    vae_config: Mapping[str, Any] = SD_VAE_CONFIG,
) -> Path:
    """Convert an official checkpoint into a pipeline directory `out_dir` that samples as the official code does.

    Args:
        checkpoint: the released `.pth` (a state dict, read weights-only) or a `.safetensors` file.
        config: the name of its official config (`OFFICIAL_CONFIGS`), or an `OfficialConfig`.
        out_dir: a new (or empty) directory; it is written beside as `.tmp_<name>.<pid>` and renamed into place
            when complete, so a failed conversion leaves nothing behind.
        vae: latent models only: U-ViT's `autoencoder_kl.pth` (or `autoencoder_kl_ema.pth` for the H models, as
            their evaluation uses), a diffusers AutoencoderKL folder, or an `AutoencoderKL`. It is saved with the
            checkpoint's latent scale factor (0.23010 for MS-COCO, 0.18215 for ImageNet).
        text_encoder: MS-COCO models only: a `transformers` text encoder's name or folder (a diffusers pipeline
            folder with `text_encoder/` and `tokenizer/` works), or a (model, tokenizer) pair; default CLIP
            ViT-L/14 (`openai/clip-vit-large-patch14`), as the official code.
        vae_config: the AutoencoderKL configuration of an LDM-layout `vae` file (default: U-ViT's, Stable
            Diffusion's autoencoder).

    Returns the pipeline directory. Errors (unknown config, an `out_dir` in use, a missing or superfluous vae or
    text encoder, a checkpoint that does not fit the config) are raised before anything is written.
    """
    config = get_official_config(config) if isinstance(config, str) else config
    out_dir = Path(out_dir)
    _check_arguments(config, out_dir, vae, text_encoder)
    weights = load_weights(checkpoint)
    try:
        model = build_official_model(weights, config).eval()
    except ValueError as e:
        fits = matching_configs(weights)
        hint = f"; it fits the official config(s) {fits}" if fits else "; it fits no official config"
        raise ValueError(f"checkpoint {checkpoint} does not fit {config.description}: {e}{hint}") from e
    scheduler = official_scheduler(config)
    autoencoder = None if vae is None else load_vae(vae, config.latent_scale, vae_config)
    if autoencoder is not None and autoencoder.config.latent_channels != model.config.in_channels:
        raise ValueError(f"the vae has {autoencoder.config.latent_channels} latent channels but the model takes "
                         f"{model.config.in_channels}")
    if config.text:
        encoder, tokenizer = _load_text_encoder(CLIP_L14 if text_encoder is None else text_encoder)
        pipe = UViTText2ImagePipeline(model, scheduler, autoencoder, encoder, tokenizer)
    else:
        pipe = UViTPipeline(model, scheduler, autoencoder)
    info = official_info(config, checkpoint)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}.{os.getpid()}")
    try:
        pipe.save_pretrained(tmp)
        (tmp / OFFICIAL_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def official_info(config: OfficialConfig, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What `official.json` records: the source of the weights and how the official code samples them."""
    time = TIME_CONVENTIONS[config.time]
    name = next((k for k, v in OFFICIAL_CONFIGS.items() if v == config), None)
    return {
        "config": name,
        "description": config.description,
        "source": config.source,
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "num_inference_steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "official_guidance_scale": config.scale,
        "official_sampler": OFFICIAL_SAMPLERS[config.sampler].description,
        "scheduler": OFFICIAL_SAMPLERS[config.sampler].scheduler,
        "network_time": {"timestep_offset": time.timestep_offset, "timestep_scale": time.timestep_scale,
                         "meaning": time.description},
        "latent_scale_factor": config.latent_scale,
        "null_class_trained": config.null_class,
        "fid": config.fid,
    }


def read_official_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `official.json` of a converted pipeline directory (None for a directory without one, e.g. a model
    trained here): `guidance_scale` and `num_inference_steps` are the official sampling in diffusers' terms."""
    file = Path(path) / OFFICIAL_INFO
    return json.loads(file.read_text()) if file.is_file() else None


@functools.cache
def _official_shapes(name: str) -> dict[str, torch.Size]:
    """The tensor shapes of the model official config `name` builds (built once per process, on the meta device)."""
    with torch.device("meta"):
        model = UViTModel(**official_kwargs(official_model_kwargs(OFFICIAL_CONFIGS[name])))
    return {k: v.shape for k, v in model.state_dict().items()}


def matching_configs(state_dict: Mapping[str, Tensor]) -> list[str]:
    """The official configs whose model has exactly the state dict's tensors (names and shapes)."""
    names = []
    for name, config in OFFICIAL_CONFIGS.items():
        expected, given = _official_shapes(name), official_state_dict(state_dict, config)
        if given.keys() == expected.keys() and all(given[k].shape == v for k, v in expected.items()):
            names.append(name)
    return names


__all__ = [
    "OFFICIAL_CONFIGS", "OFFICIAL_INFO", "OFFICIAL_SAMPLERS", "SD_VAE_CONFIG", "TIME_CONVENTIONS", "OfficialConfig",
    "OfficialSampler", "TimeConvention", "build_official_model", "convert_ldm_vae", "convert_official",
    "file_sha256", "get_official_config", "load_vae", "load_weights", "matching_configs", "official_info",
    "official_model_kwargs", "official_scheduler", "official_scheduler_config", "official_state_dict",
    "read_official_info", "vp_sde_betas",
]
