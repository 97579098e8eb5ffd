"""From a released official U-ViT / U-ViC checkpoint to a pipeline directory that samples as the official code does.

Every released checkpoint is described once, as data, in `OFFICIAL_CONFIGS` (`uvit_cog.official_configs`; by the
name of its official config: `configs/<name>.py` in baofff/U-ViT, `U-ViC/configs/<name>.py` in trestad/CogAttn): the
constructor arguments
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
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model import UViTModel
from .official_configs import (  # the facts of each release (re-exported: one import for users)
    OFFICIAL_CONFIGS,
    OFFICIAL_SAMPLERS,
    SD_VAE_CONFIG,
    TIME_CONVENTIONS,
    OfficialConfig,
    OfficialSampler,
    TimeConvention,
    get_official_config,
    official_kwargs,
    vp_sde_betas,
)
from .pipeline import UViTPipeline, UViTText2ImagePipeline
from .rundir import TMP_PREFIX
from .schedule import make_scheduler, scheduler_config
from .text import CLIP_L14, load_text_encoder

OFFICIAL_INFO = "official.json"  # written beside model_index.json


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
