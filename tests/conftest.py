"""Fixtures and helpers shared by several test modules (helpers are imported: `from conftest import ...`)."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from hydra import compose, initialize, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
)

from uvit_cog import UViTPipeline, UViTText2ImagePipeline
from uvit_cog.checkpoints import list_checkpoints
from uvit_cog.images import load_npz_arrays
from uvit_cog.schedule import make_scheduler, scheduler_config
from uvit_cog.testing import tiny_clip_text_config, tiny_clip_tokenizer, tiny_model, tiny_t2i_components, tiny_vae

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
    tiny_vae().save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Tiny CLIP models (uvit_cog.testing builds them): nothing is downloaded, and they load through the same code path
# as real ones.


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
    pipe = UViTText2ImagePipeline(**tiny_t2i_components(scheduler, vae, num_text_tokens, **overrides))
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
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_script = load_entry_point("train")


def load_sample_script() -> ModuleType:
    """sample.py, freshly executed (which also registers conf/sample.yaml with Hydra's config store)."""
    return load_entry_point("sample")


def sample_config(*overrides: str) -> DictConfig:
    """sample.py's Hydra config with `overrides`, as `python sample.py key=value ...` would compose it."""
    load_sample_script()
    with initialize(config_path=None, version_base=None):
        return compose("sample", overrides=list(overrides))


def read_pngs(folder: Path, n: int) -> np.ndarray:
    """Images 000000.png … of a sample set, stacked."""
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


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


# ----------------------------------------------------------------------------------------------------------
# Captioned image sources and CLIP models for text-to-image (uvit_cog.captions, uvit_cog.clip_score)

_WORDS = (("a red", "a small", "two", "an old", "a striped"), ("bus", "cat", "kite", "horse", "teapot"),
          ("standing", "parked", "sleeping", "flying", "sitting"), ("on a street", "in a field", "near the sea",
          "on a table", "under a tree"))


def _caption(rng: np.random.Generator) -> str:
    return " ".join(words[rng.integers(len(words))] for words in _WORDS) + "."


def _random_image(rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """Random pixels of a random non-square size (16..47 pixels a side)."""
    h = int(rng.integers(16, 48))
    w = h + int(rng.integers(1, 16)) * (1 if rng.random() < 0.5 else -1)
    image = Image.fromarray(rng.integers(0, 256, (h, max(w, 8), 3), dtype=np.uint8))
    return image.convert(mode)


class CaptionedFixture(NamedTuple):
    """A fixture folder and what a reader should find in it: (file relative to `root`, captions) in order."""

    root: Path
    items: dict[str, list[tuple[str, list[str]]]] | list[tuple[str, list[str]]]


def make_coco_fixture(root: Path, sizes: tuple[int, int] = (6, 4), uncaptioned: int = 1,
                      seed: int = 0) -> CaptionedFixture:
    """A tiny MS-COCO 2014 download: `root/{train,val}2014/COCO_*.jpg` (random non-square JPEGs) and
    `root/annotations/captions_{train,val}2014.json` with COCO's structure (`info`, `images` with id, file_name,
    width, height, `annotations` with image_id, id, caption, `licenses`).

    `sizes` captioned images per split get 1..7 captions each, plus `uncaptioned` images per split that no
    annotation names. The files list images out of id order and interleave the images' annotations, whose ids
    follow no order; each image's captions are in `items`' order in the file. `items` maps each split to the
    expected (file_name, captions), sorted by image id.
    """
    rng = np.random.default_rng(seed)
    expected, next_ann = {}, 1
    for split, count in zip(("train2014", "val2014"), sizes, strict=True):
        (root / split).mkdir(parents=True)
        ids = sorted(rng.choice(np.arange(1, 600_000), size=count + uncaptioned, replace=False).tolist())
        images, annotations, items = [], [], []
        for n, image_id in enumerate(ids):
            name = f"COCO_{split}_{image_id:012d}.jpg"
            image = _random_image(rng)
            image.save(root / split / name, quality=95)
            images.append({"license": 1, "file_name": name, "coco_url": "", "height": image.height,
                           "width": image.width, "date_captured": "2013-11-14 11:18:45", "id": image_id})
            if n < uncaptioned:
                continue
            captions = [_caption(rng) for _ in range(int(rng.integers(1, 8)))]
            annotations.extend({"image_id": image_id, "caption": caption} for caption in captions)
            items.append((name, captions))
        expected[split] = items  # ids were drawn sorted
        order = rng.permutation(len(annotations))  # interleaved: each image's captions keep their order
        by_image: dict[int, list[dict]] = {}
        for ann in annotations:
            by_image.setdefault(ann["image_id"], []).append(ann)
        queues = [by_image[annotations[i]["image_id"]] for i in order]
        shuffled = [queue.pop(0) for queue in queues]
        for ann, ann_id in zip(shuffled, rng.permutation(len(shuffled)).tolist(), strict=True):
            ann["id"] = next_ann + ann_id  # ids in no order: captions are read in the file's order, as pycocotools
        next_ann += len(shuffled)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({
            "info": {"description": "tiny COCO-like fixture", "year": 2014}, "licenses": [{"id": 1, "name": "x"}],
            "images": [images[i] for i in rng.permutation(len(images))], "annotations": shuffled}))
    return CaptionedFixture(root, expected)


def make_captioned_folder(root: Path, count: int = 6, unlisted: int = 1, seed: int = 0) -> CaptionedFixture:
    """An image folder with a `metadata.jsonl` (`file_name`, `text`), as `datasets`' imagefolder reads it:
    `count` captioned images of varied non-square sizes and modes (RGB, grayscale, RGBA, palette; PNG and JPEG),
    every other one in the subfolder `more/`, every third with a list of captions, plus `unlisted` images that no
    line names. `items` is the expected (file_name, captions) in line order."""
    rng = np.random.default_rng(seed)
    (root / "more").mkdir(parents=True)
    modes, items = ("RGB", "L", "RGBA", "P"), []
    for i in range(count):
        name = f"more/{i:04d}.jpg" if i % 2 else f"{i:04d}.png"
        mode = modes[i // 2 % len(modes)] if name.endswith(".png") else "RGB"
        _random_image(rng, mode).save(root / name)
        captions = [_caption(rng) for _ in range(int(rng.integers(2, 4)) if i % 3 == 0 else 1)]
        items.append((name, captions))
    for i in range(unlisted):
        _random_image(rng).save(root / f"unlisted_{i}.png")
    lines = [{"file_name": name, "text": caps if i % 3 == 0 else caps[0]} for i, (name, caps) in enumerate(items)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return CaptionedFixture(root, items)


def tiny_clip_processor(image_size: int = 32) -> CLIPProcessor:
    """`tiny_clip_tokenizer` with a CLIP image processor (shortest side to `image_size`, centre crop, CLIP's
    mean and std)."""
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer())


def tiny_clip(hidden_size: int = 32, projection_dim: int = 16, image_size: int = 32, seed: int = 0) -> CLIPModel:
    """A random 2-layer CLIP model (text: `tiny_clip_text_config`; vision: 8-pixel patches of `image_size`)."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8)
    config = CLIPConfig(text_config=tiny_clip_text_config(hidden_size).to_dict(), vision_config=vision,
                        projection_dim=projection_dim)
    return CLIPModel(config).eval()


def save_tiny_clip(path: Path, model: CLIPModel | None = None, image_size: int = 32) -> Path:
    """A CLIP model folder laid out as `openai/clip-vit-large-patch14`: config.json and model.safetensors, the
    image processor's preprocessor_config.json and the tokenizer's files side by side; `model` defaults to
    `tiny_clip()`."""
    (model or tiny_clip(image_size=image_size)).save_pretrained(path)
    processor = tiny_clip_processor(image_size)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    return path
