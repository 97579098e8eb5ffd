"""Captioned image sources for text-to-image training: MS-COCO as downloaded, and `metadata.jsonl` folders.

- **MS-COCO** (2014, as U-ViT trains on it; 2017 has the same layout):
  `ROOT/train2014/*.jpg`, `ROOT/val2014/*.jpg`, `ROOT/annotations/captions_{train,val}2014.json`.
  Items are ordered by image id and keep every caption of an image in the annotation file's order, as the
  official `MSCOCODatabase` (pycocotools' `getAnnIds`) does, so item i and caption j are the official
  `{i}_{j}.npy` features. Images without captions are skipped, with a warning that says how many.
- **Captioned folder**: `ROOT/metadata.jsonl`, one JSON object per line with `file_name` (relative to ROOT,
  subfolders allowed) and `text` (one caption or a list), the layout `datasets`' imagefolder loader and
  diffusers' text-to-image example read. Items follow the order of the lines; lines naming the same file add
  captions to one item (as COCO's annotations do). Images in the folder that no line names are skipped, with a
  warning that says how many.

Every fault of either format (a missing file, a line that is not JSON, a missing key, an empty caption, a file
that is not an image) is reported with the file, line or id before any image is read. Images are decoded by
`uvit_cog.images.open_rgb` and prepared as U-ViT's MS-COCO code does (`center_square_crop`): a centre square
crop, a LANCZOS resize, no flips. The datasets are deterministic: which caption a training step uses is drawn
elsewhere, seeded per sample.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, is_image_file, open_rgb, to_unit_range

METADATA_FILE = "metadata.jsonl"
COCO_ANNOTATIONS = "annotations"
MAX_NAMED = 5  # faults named in full in one error; the rest are counted


class CaptionedImage(NamedTuple):
    """One item of a captioned source: an image file and all its captions (at least one)."""

    path: Path
    captions: list[str]


def _name_some(things: Sequence[Any]) -> str:
    """The first `MAX_NAMED` of `things`, and how many more there are."""
    shown = ", ".join(str(t) for t in things[:MAX_NAMED])
    return shown + (f" and {len(things) - MAX_NAMED} more" if len(things) > MAX_NAMED else "")


def _check_image_files(items: Sequence[CaptionedImage], where: str) -> None:
    """Raise naming the items whose file is missing or has no image extension, before any image is read."""
    not_images = [item.path for item in items if item.path.suffix.lower() not in IMAGE_EXTENSIONS]
    if not_images:
        raise ValueError(
            f"{where}: {len(not_images)} file(s) without an image extension ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{_name_some(not_images)}; captions must name image files"
        )
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{where}: {len(missing)} of {len(items)} captioned image(s) not found: {_name_some(missing)}; "
            "download or restore them, or remove their captions"
        )


def _warn_skipped(count: int, where: str, why: str) -> None:
    if count:
        warnings.warn(f"{where}: skipped {count} image(s) {why}", stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# MS-COCO


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error}); download the annotations again") from error


def _caption_text(value: Any, where: str) -> str:
    """A caption: a string with some non-blank text, or an error naming where it came from."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: caption {value!r} is not a non-empty string")
    return value


def coco_items(root: str | Path, split: str = "train2014") -> list[CaptionedImage]:
    """The captioned images of an MS-COCO split: `ROOT/{split}/` with `ROOT/annotations/captions_{split}.json`.

    `split` is `train2014` (U-ViT's training set) or `val2014` (its test split), or any other folder laid out
    the same way (`train2017`). Items are sorted by image id; captions keep the annotation file's order.
    """
    root = Path(root)
    folder, ann_file = root / split, root / COCO_ANNOTATIONS / f"captions_{split}.json"
    missing = [str(p) for p in (folder, ann_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"MS-COCO split {split!r} under {root}: {', '.join(missing)} not found; the layout is "
            f"ROOT/{split}/*.jpg and ROOT/{COCO_ANNOTATIONS}/captions_{split}.json (as downloaded from cocodataset.org)"
        )
    data = _read_json(ann_file)
    if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
        raise ValueError(f"{ann_file}: expected a COCO captions file with 'images' and 'annotations' lists")
    files: dict[int, str] = {}
    for n, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not {"id", "file_name"} <= image.keys():
            raise ValueError(f"{ann_file}: images[{n}] = {image!r} lacks 'id' or 'file_name'")
        if image["id"] in files:
            raise ValueError(f"{ann_file}: image id {image['id']} appears twice in 'images'")
        files[image["id"]] = image["file_name"]
    captions: dict[int, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "caption"} <= ann.keys():
            raise ValueError(f"{ann_file}: annotations[{n}] = {ann!r} lacks 'image_id' or 'caption'")
        where = f"{ann_file}: annotation {ann.get('id', f'#{n}')} (image {ann['image_id']})"
        captions.setdefault(ann["image_id"], []).append(_caption_text(ann["caption"], where))
    # Captions of image ids that 'images' does not list are ignored, as the official loader (keyed by 'images')
    # ignores them: a trimmed 'images' list selects a subset.
    items = [CaptionedImage(folder / files[key], captions[key]) for key in sorted(files) if key in captions]
    _check_image_files(items, f"MS-COCO {split} ({ann_file})")
    _warn_skipped(len(files) - len(items), f"MS-COCO {split}", f"of {len(files)} without captions in {ann_file}")
    return items


# ----------------------------------------------------------------------------------------------------------------
# Image folder with metadata.jsonl


def _line_captions(value: Any, where: str) -> list[str]:
    """The `text` of a metadata line: one caption or a non-empty list of them."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{where}: 'text' is an empty list; give at least one caption")
    return [_caption_text(v, where) for v in values]


def _relative_file(root: Path, name: Any, where: str) -> Path:
    """`file_name` as a path inside `root`; absolute names and names leading out of `root` are refused."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'file_name' {name!r} is not a file name")
    relative = os.path.normpath(name)
    if os.path.isabs(relative) or relative.split(os.sep)[0] == os.pardir:
        raise ValueError(f"{where}: 'file_name' {name!r} must be a path relative to {root}, inside it")
    return root / relative


def folder_items(root: str | Path) -> list[CaptionedImage]:
    """The captioned images of a folder with a `metadata.jsonl` (`file_name`, `text` per line), in line order."""
    root = Path(root)
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{metadata} not found: a captioned folder holds its images and a {METADATA_FILE} with one line "
            'per image, e.g. {"file_name": "0001.png", "text": "a red bus"}'
        )
    by_file: dict[Path, list[str]] = {}
    with metadata.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not a JSON object ({error}): {line.strip()[:80]!r}") from error
            if not isinstance(record, dict) or not {"file_name", "text"} <= record.keys():
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{where}: needs the keys 'file_name' and 'text', found {keys}")
            path = _relative_file(root, record["file_name"], where)
            by_file.setdefault(path, []).extend(_line_captions(record["text"], where))
    if not by_file:
        raise ValueError(f"{metadata}: no lines; add one per image")
    items = [CaptionedImage(path, captions) for path, captions in by_file.items()]
    _check_image_files(items, str(metadata))
    unlisted = sum(1 for p in root.rglob("*") if is_image_file(p) and p not in by_file)
    _warn_skipped(unlisted, str(root), f"that {METADATA_FILE} does not name")
    return items


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and the dataset


def center_square_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """U-ViT's MS-COCO preprocessing (`center_crop` in its datasets.py): the centred square of side
    min(H, W) (offsets rounded down), resized to `resolution` with LANCZOS; uint8 (R, R, 3)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((resolution, resolution), Image.LANCZOS))


class CaptionedImageDataset(Dataset):
    """Captioned images as training items: `{"x": image, "captions": [str, ...]}`.

    `x` is a float (3, R, R) image in [-1, 1] (`center_square_crop`, then `to_unit_range`), every caption of
    the image is kept; unlabelled (`num_classes = 0`) like the toolkit's other image datasets. Batch with
    `collate_captioned` (captions vary in number, which torch's default collate refuses).
    """

    def __init__(self, items: Sequence[CaptionedImage], resolution: int) -> None:
        if not items:
            raise ValueError("no captioned images")
        if int(resolution) < 1:
            raise ValueError(f"resolution={resolution} must be a positive number of pixels")
        self.items = list(items)
        self.num_classes, self.channels, self.resolution = 0, 3, int(resolution)

    @classmethod
    def from_coco(cls, root: str | Path, split: str, resolution: int) -> CaptionedImageDataset:
        """An MS-COCO split (`coco_items`)."""
        return cls(coco_items(root, split), resolution)

    @classmethod
    def from_folder(cls, root: str | Path, resolution: int) -> CaptionedImageDataset:
        """A folder with a `metadata.jsonl` (`folder_items`)."""
        return cls(folder_items(root), resolution)

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, i: int) -> Tensor:
        """Image `i` as uint8 (3, R, R): what FID's Inception reads (the MS-COCO reference statistics)."""
        pixels = center_square_crop(open_rgb(self.items[i].path), self.resolution)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def image(self, i: int) -> Tensor:
        """Image `i` as float (3, R, R) in [-1, 1]."""
        return to_unit_range(self.pixels(i))

    def captions(self, i: int) -> list[str]:
        """Every caption of image `i` (a copy: callers may not change the dataset)."""
        return list(self.items[i].captions)

    def num_captions(self, i: int) -> int:
        """How many captions image `i` has."""
        return len(self.items[i].captions)

    def caption_item(self, i: int, k: int) -> dict[str, Tensor | str]:
        """Image `i` with its caption `k`: the training item `uvit_cog.data.CaptionDraw` draws."""
        return {"x": self.image(i), "caption": self.items[i].captions[k]}

    def __getitem__(self, i: int) -> dict[str, Tensor | list[str]]:
        return {"x": self.image(i), "captions": self.captions(i)}


class CaptionedPixels(Dataset):
    """The images of a `CaptionedImageDataset` as uint8 (3, R, R) tensors, as `uvit_cog.metrics` reads images."""

    def __init__(self, dataset: CaptionedImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:
        return self.dataset.pixels(i)


def fid_prompts(items: Sequence[CaptionedImage], num: int, seed: int = 0) -> list[tuple[CaptionedImage, int]]:
    """The prompts of the MS-COCO FID protocol: one caption each of `num` distinct images, as (item, caption index).

    U-ViT's evaluation takes the first `num` images of a shuffled validation loader, each with one of its captions
    drawn at random; here the order and the draws come from one generator seeded `seed`, so the same call gives the
    same prompts anywhere.
    """
    if not 0 < num <= len(items):
        raise ValueError(f"num={num}: the protocol takes one caption each of num distinct images, and there are "
                         f"{len(items)}; give 1 <= num <= {len(items)}")
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(items), generator=generator)[:num].tolist()
    return [(items[i], int(torch.randint(len(items[i].captions), (1,), generator=generator))) for i in order]


def collate_captioned(batch: Sequence[dict[str, Any]]) -> dict[str, Tensor | list[list[str]]]:
    """A batch of `CaptionedImageDataset` items: images stacked, captions kept as one list per image."""
    return {"x": torch.stack([item["x"] for item in batch]), "captions": [item["captions"] for item in batch]}
