"""CLIP score: how well generated images follow their prompts.

CLIPScore (Hessel, Holtzman, Forbes, Le Bras and Choi, "CLIPScore: A Reference-free Evaluation Metric for
Image Captioning", EMNLP 2021, arXiv:2104.08718) rates an image v against a text c by the cosine of their
CLIP embeddings, CLIP-S(c, v) = w · max(cos(E_c, E_v), 0), with w = 2.5 in the paper. Text-to-image papers
report it with w = 100, as torchmetrics' `CLIPScore` does: here every image gets 100 · max(cos, 0) against its
own prompt, and the score is the mean over images. (torchmetrics clamps the mean of 100 · cos instead of each
value; the two agree whenever no cosine is negative, and `ClipScoreResult.cosine` keeps the raw values.)

The model is a `transformers` `CLIPModel` with its tokenizer and image processor in one folder, as
`openai/clip-vit-large-patch14` (the usual choice, and the default) is laid out; a hub name or a local path.
Image embeddings are the vision tower's pooled output through `visual_projection`, text embeddings the text
tower's pooled (end-of-text) output through `text_projection`, each L2-normalised: `CLIPModel`'s own
`get_image_features` / `get_text_features`. Prompts are cut to the model's context (77 tokens for CLIP) and
padded to it, so an image's score does not depend on which prompts share its batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import AutoConfig, CLIPModel, CLIPProcessor

from .images import as_rgb_uint8, load_images
from .metrics import resolve_device

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_SCALE = 100.0  # torchmetrics' w; Hessel et al. use 2.5

# What a CLIP model folder holds (any one file of each group), named in the error when a group is missing.
CLIP_FOLDER_FILES = {
    "the model's config": ("config.json",),
    "the weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json"),
    "the image processor's config": ("preprocessor_config.json", "processor_config.json"),
    "the tokenizer": ("tokenizer.json", "vocab.json"),
}

ImageInput = str | Path | np.ndarray | Dataset | Sequence[Image.Image | np.ndarray]


@dataclass(frozen=True)
class ClipScoreResult:
    """CLIP score of images against their prompts: `mean` of `per_image` = 100 · max(`cosine`, 0)."""

    mean: float
    per_image: np.ndarray  # (N,) float64
    cosine: np.ndarray  # (N,) float64, unclamped

    def __len__(self) -> int:
        return len(self.per_image)


def check_clip_folder(path: Path) -> None:
    """Raise naming what a local folder lacks to be a CLIP model folder (config, weights, image processor,
    tokenizer), or saying what it is instead (a diffusers pipeline, a single tower)."""
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a folder; give a CLIP model folder or a hub name ({DEFAULT_CLIP})")
    if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is a diffusers pipeline, not a CLIP model: its text_encoder is only CLIP's text tower, and the "
            f"score needs both towers; give a CLIPModel folder such as a download of {DEFAULT_CLIP}"
        )
    missing = [f"{what} ({' or '.join(names)})" for what, names in CLIP_FOLDER_FILES.items()
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a CLIP model folder: it lacks {'; '.join(missing)}. A CLIP folder holds the model "
            f"(CLIPModel.save_pretrained), its image processor and its tokenizer side by side, as {DEFAULT_CLIP}"
        )


def check_clip_config(config: object, where: str) -> None:
    """Raise unless `config` is a full CLIP model's (model_type `clip`: both towers), naming what it is instead."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("clip_text_model", "clip_vision_model"):
        tower = "vision" if model_type == "clip_text_model" else "text"
        raise ValueError(
            f"{where}: a CLIP model without a {tower} tower (model_type {model_type!r}); the score compares image "
            f"and text embeddings, so it needs a full CLIPModel such as {DEFAULT_CLIP}"
        )
    if model_type != "clip":
        raise ValueError(f"{where}: model_type {model_type!r} is not CLIP ('clip'); give a CLIPModel such as "
                         f"{DEFAULT_CLIP}")


class ImageList(Dataset):
    """Images of any sizes held in memory as uint8 (3, H, W) tensors."""

    def __init__(self, images: Sequence[Tensor]) -> None:
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def as_image_dataset(images: ImageInput) -> Dataset:
    """Images as a Dataset of uint8 (3, H, W) tensors: a flat folder of PNGs, an `.npz` (`FILE.npz[:KEY]`), a
    uint8 array batch, a Dataset of such tensors (`uvit_cog.images.load_images`), or a list of PIL images or
    uint8 (H, W[, C]) arrays, which may differ in size."""
    if isinstance(images, Image.Image):
        raise TypeError("images: one PIL image; pass a list of images, one per prompt")
    if isinstance(images, str | Path | np.ndarray | Dataset):
        dataset = load_images(images)
    elif isinstance(images, Sequence):
        tensors = []
        for i, image in enumerate(images):
            if isinstance(image, Image.Image):
                image = np.asarray(image.convert("RGB"))
            if not isinstance(image, np.ndarray):
                raise TypeError(f"images[{i}]: {type(image).__name__}, expected a PIL image or a uint8 array")
            tensors.append(torch.from_numpy(as_rgb_uint8(image[None], f"images[{i}]")[0].copy()).permute(2, 0, 1))
        dataset = ImageList(tensors)
    else:
        raise TypeError(f"images: {type(images).__name__} is not a folder, .npz, array, Dataset or list of images")
    if len(dataset) == 0:
        raise ValueError("images: none given")
    first = dataset[0]
    if not (isinstance(first, Tensor) and first.dtype == torch.uint8 and first.ndim == 3 and first.shape[0] == 3):
        found = f"{first.dtype} {tuple(first.shape)}" if isinstance(first, Tensor) else type(first).__name__
        raise TypeError(f"images: a Dataset whose items are {found}, expected uint8 (3, H, W) tensors")
    return dataset


def check_prompts(prompts: Sequence[str], num_images: int) -> list[str]:
    """The prompts as a list of strings, one per image, or an error saying what is wrong."""
    if isinstance(prompts, str):
        raise TypeError("prompts: one string; pass a list of prompts, one per image, in the images' order")
    prompts = list(prompts)
    wrong = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"prompts[{wrong[0]}] is {type(prompts[wrong[0]]).__name__}, not a string")
    if len(prompts) != num_images:
        raise ValueError(
            f"{len(prompts)} prompts for {num_images} images: CLIP score pairs image i with prompt i, so give "
            "exactly one prompt per image in the images' order"
        )
    return prompts


class ClipScorer:
    """A CLIP model and its processor, kept loaded to score many image sets (`score`)."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: str | torch.device = "auto") -> None:
        check_clip_config(model.config, type(model).__name__)
        self.device = torch.device(resolve_device(device) if isinstance(device, str) else device)
        self.model = model.eval().to(self.device)
        self.processor = processor
        # The context the text tower has positions for; the tokenizer's own limit may be unset (a huge number).
        self.max_length = min(model.config.text_config.max_position_embeddings, processor.tokenizer.model_max_length)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = DEFAULT_CLIP, device: str | torch.device = "auto"
    ) -> ClipScorer:
        """Load a CLIP model folder (config, weights, image processor, tokenizer) or a hub name; refuses folders
        that are not one, models without both towers and checkpoints that leave weights uninitialised."""
        path = Path(name_or_path)
        local = path.exists()
        if local:
            check_clip_folder(path)
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError, json.JSONDecodeError) as error:
            where = "" if local else " (not a local folder, nor a model found on the Hugging Face Hub or its cache)"
            raise OSError(f"{name_or_path}{where}: cannot read a model config ({error})") from error
        check_clip_config(config, str(name_or_path))
        model, info = CLIPModel.from_pretrained(name_or_path, output_loading_info=True)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{name_or_path}: the checkpoint lacks {len(missing)} CLIP weights ({', '.join(missing[:3])}, ...), "
                "which would be random; give a complete CLIPModel checkpoint"
            )
        return cls(model, CLIPProcessor.from_pretrained(name_or_path), device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Tensor]) -> Tensor:
        """L2-normalised embeddings (N, D) of uint8 (3, H, W) images, preprocessed by the model's processor."""
        pixels = self.processor.image_processor(
            images=[image.cpu() for image in images], input_data_format="channels_first", return_tensors="pt"
        )["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised embeddings (N, D) of prompts, cut and padded to the model's context (`max_length`)."""
        tokens = self.processor.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def score(self, images: ImageInput, prompts: Sequence[str], batch_size: int = 64,
              progress: bool = False) -> ClipScoreResult:
        """CLIP score of `images` against `prompts` (image i with prompt i), in batches of `batch_size`.

        `images`: a flat folder of PNGs (sorted by name, as `sample.py` numbers them), an `.npz`, a uint8 array
        batch, a Dataset of uint8 (3, H, W) tensors, or a list of PIL images / uint8 arrays.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        images = as_image_dataset(images)
        prompts = check_prompts(prompts, len(images))
        cosines = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="CLIP score", unit="batch", disable=not progress):
            stop = min(start + batch_size, len(prompts))
            image_emb = self.image_features([images[i] for i in range(start, stop)])
            text_emb = self.text_features(prompts[start:stop])
            cosines.append((image_emb * text_emb).sum(-1).double().cpu())
        cosine = torch.cat(cosines).numpy()
        per_image = CLIP_SCALE * np.maximum(cosine, 0.0)
        return ClipScoreResult(float(per_image.mean()), per_image, cosine)


def clip_score(images: ImageInput, prompts: Sequence[str], model: str | Path | ClipScorer = DEFAULT_CLIP,
               batch_size: int = 64, device: str | torch.device = "auto", progress: bool = False) -> ClipScoreResult:
    """CLIP score of `images` against `prompts` (see `ClipScorer.score`) with a CLIP model folder, hub name or
    loaded `ClipScorer`; the images and prompts are checked before the model loads."""
    images = as_image_dataset(images)
    check_prompts(prompts, len(images))
    scorer = model if isinstance(model, ClipScorer) else ClipScorer.from_pretrained(model, device)
    return scorer.score(images, prompts, batch_size, progress)
