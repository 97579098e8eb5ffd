"""Fixtures and helpers shared by several test modules (helpers are imported: `from conftest import ...`)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from uvit_cog import UViTModel, UViTPipeline, UViTText2ImagePipeline
from uvit_cog.checkpoints import list_checkpoints
from uvit_cog.images import load_npz_arrays
from uvit_cog.schedule import make_scheduler, scheduler_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory) -> Path:
    """The first 256 real MNIST training digits (grayscale NHW) from ../shared/data/mnist.npz, as a small .npz."""
    x, y = load_npz_arrays(DATA / "mnist.npz")
    path = tmp_path_factory.mktemp("npz") / "mnist256.npz"
    np.savez(path, x_train=x[:256], y_train=y[:256])
    return path


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot to contention.

    Opt in per module: `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Class names of `tiny_model` (3 classes): id 1 has a synonym.
TINY_NAMES = {0: "cat", 1: "dog, puppy", 2: "bird"}


def tiny_model(num_classes: int = 3, **overrides) -> UViTModel:
    """A randomly initialised (seed 0) tiny `UViTModel`: 8x8 RGB, 2 blocks; 3 classes named by `TINY_NAMES`."""
    torch.manual_seed(0)
    cfg = dict(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)
    if num_classes == 3:
        cfg["id2label"] = TINY_NAMES
    return UViTModel(**{**cfg, **overrides}).eval()


def tiny_pipeline(num_classes: int = 3, scheduler: str = "ddim", prediction_type: str = "epsilon",
                  vae: AutoencoderKL | None = None, **overrides) -> UViTPipeline:
    """A `UViTPipeline` around `tiny_model` on a linear schedule, progress bar off."""
    scheduler = make_scheduler(scheduler, scheduler_config("linear", prediction_type))
    pipe = UViTPipeline(tiny_model(num_classes, **overrides), scheduler, vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_script(name: str) -> ModuleType:
    """Import a script from scripts/ (not a package) by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, seed: int = 0) -> Path:
    """A class folder (root/<class>/<image>) of random RGB PNGs of varied, non-square sizes."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def tiny_vae_dir(path: Path) -> Path:
    """A randomly initialised AutoencoderKL (downsampling by 2, 4 latent channels) saved with save_pretrained."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(path)
    return path



# ----------------------------------------------------------------------------------------------------------
# Tiny CLIP models, built here: nothing is downloaded, and they load through the same code path as real ones.


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's `bytes_to_unicode`), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer without merges: every byte is a token (514 ids with <|startoftext|> and <|endoftext|>).

    It lowercases, splits and pads like CLIP's own, so prompts of any text tokenize; only the vocabulary is small.
    """
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_clip_text_config(hidden_size: int = 32, **overrides) -> CLIPTextConfig:
    """A 2-layer CLIP text model's config over `tiny_clip_tokenizer`'s vocabulary, 77 positions as CLIP's."""
    tok = tiny_clip_tokenizer()
    return CLIPTextConfig(**{
        "vocab_size": len(tok), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        **overrides})


def save_tiny_clip_text(path: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A random CLIP text model and its tokenizer saved as a text-encoder folder: `path/text_encoder`,
    `path/tokenizer` (the layout of a diffusers pipeline, and what `from_pretrained` of each reads)."""
    torch.manual_seed(seed)
    CLIPTextModel(tiny_clip_text_config(hidden_size)).eval().save_pretrained(path / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(path / "tokenizer")
    return path



def tiny_t2i_pipeline(scheduler: str = "ddim", vae: AutoencoderKL | None = None, num_text_tokens: int = 8,
                      **overrides) -> UViTText2ImagePipeline:
    """A `UViTText2ImagePipeline` around a tiny text-conditional `UViTModel` (8x8, 2 blocks, seed 0) and a tiny
    random CLIP text model (width 32) with `tiny_clip_tokenizer`; linear schedule, progress bar off."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_clip_text_config()).eval()
    in_channels = vae.config.latent_channels if vae is not None else 3
    model = tiny_model(num_classes=0, text_dim=32, num_text_tokens=num_text_tokens, in_channels=in_channels,
                       **overrides)
    pipe = UViTText2ImagePipeline(model, make_scheduler(scheduler, scheduler_config("linear", "epsilon")), vae,
                                  text_encoder, tiny_clip_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------
# train.py: tiny runs and their weights

# A tiny U-ViC, 4 optimiser steps of 8 images, checkpoints every 2 steps, 2-step sample grids.
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2", "train.steps=4",
    "train.batch_size=8", "optim.warmup_steps=2", "log.every=1", "log.sample_every=2", "log.checkpoint_every=2",
    "sample.grid_size=2", "sample.steps=2", "sample.guidance=1.5",
]


def load_entry_point(name: str) -> ModuleType:
    """Import an entry-point script at the repository root (train.py, sample.py, ...) by path; the root joins
    sys.path as it does for `python train.py`, so the script's sibling modules (train_setup.py) import."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = load_entry_point("train")


def train_config(*overrides: str):
    """conf/train.yaml composed with `overrides`, as `python train.py OVERRIDES` would see it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("train", overrides=list(overrides))


def npz_overrides(path: Path, run_dir: Path, *extra: str) -> list[str]:
    """TINY on a grayscale 8x8 `.npz` (e.g. the `mnist_npz` fixture) into `run_dir`."""
    return ["data=npz", f"data.path={path}", "data.channels=1", "data.resolution=8", *TINY, f"run_dir={run_dir}",
            *extra]


def final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a finished run's final export."""
    return load_file(run_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The raw (non-EMA) weights of a run's newest checkpoint."""
    return load_file(list_checkpoints(run_dir)[-1] / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0.0, msg=key)
