"""Training datasets: scikit-learn digits, CIFAR-10, `.npz` arrays, class folders, captioned images (MS-COCO,
`metadata.jsonl` folders: `uvit_cog.captions`), VAE latents with or without text features.

The files themselves are read by `uvit_cog.images` (the one `.npz` syntax `FILE.npz:KEY`, the class-folder
layout, image decoding) and `uvit_cog.captions`; this module turns them into training samples.

Every item is a dict: `x` and the condition as named fields (`uvit_cog.conditioning`). Pixel datasets give `x`
as float images (C, H, W) in [-1, 1], the latent dataset the stored VAE moments (2C, h, w) = [mean, logvar],
turned into a latent sample by `sample_latents` in the training step (so the noise comes from the training
step's seeded generator). Labelled data adds `class_labels` (int64); data without labels has none and
`num_classes = 0`. Captioned data (`num_captions(i)`, `caption_item(i, k)`) gives one caption per draw:
`CaptionDraw` picks it from a generator seeded by the sample's position in the global data stream, and the item
carries `caption` (text, encoded in the training step) or `encoder_hidden_states` (extracted features). Random
flips and condition dropout are drawn in the training step for the same reason; datasets are deterministic.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .captions import CaptionedImageDataset
from .images import as_nhwc, class_folder_items, load_npz_arrays, open_rgb, split_npz_spec, to_unit_range

# folder: a class folder, root/<class>/<image>; captions: MS-COCO or a metadata.jsonl folder (data.format)
DATA_KINDS = ("digits", "cifar10", "npz", "folder", "latents", "captions")
CAPTION_FORMATS = ("coco", "folder")
# Where the held-out images of the validation loss come from: the data's own test split (CIFAR-10's, an .npz's
# x_test), or `holdout` items that `build_dataset` keeps out of training.
VAL_SPLITS = ("test", "holdout")
LATENT_META = "meta.json"


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's / U-ViT's ImageNet preprocessing: halve with a box filter, bicubic-resize the short side, center crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class ArrayDataset(Dataset):
    """Images held in memory as uint8, resized once to `resolution` (bilinear, antialiased) if needed.

    `images` is uint8 (N, H, W, C), (N, C, H, W) or grayscale (N, H, W), checked by `uvit_cog.images.as_nhwc` (an
    ambiguous shape is refused, other dtypes get the conversion their range calls for); `labels` is (N,) or None
    (unlabelled).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, resolution: int, name: str = "images") -> None:
        images = as_nhwc(images, name)
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"{name}: images must be square, got {images.shape[1]}x{images.shape[2]}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{name}: {len(labels)} labels for {len(images)} images")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if x.shape[-1] != resolution:
            x = torch.cat([
                F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear",
                              antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8)
                for chunk in x.split(4096)
            ])
        self.images = x.contiguous()
        self.labels = torch.zeros(len(x), dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
        self.num_classes = int(self.labels.max()) + 1 if labels is not None else 0
        self.channels, self.resolution = x.shape[1], resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"x": to_unit_range(self.images[i])}
        if self.num_classes:
            item["class_labels"] = self.labels[i]
        return item


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped inside the package) as uint8 images and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModuleNotFoundError("data=digits needs scikit-learn: pip install scikit-learn") from e

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class ClassFolderDataset(Dataset):
    """A class folder (root/<class>/<image>, `uvit_cog.images.class_folder_items`), decoded to RGB by
    `uvit_cog.images.open_rgb`, center-cropped and resized to `resolution` (`center_crop_arr`)."""

    def __init__(self, root: str | Path, resolution: int) -> None:
        self.classes, self.items = class_folder_items(root)
        self.num_classes, self.channels, self.resolution = len(self.classes), 3, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        path, label = self.items[i]
        arr = center_crop_arr(open_rgb(path), self.resolution)
        return {"x": to_unit_range(torch.from_numpy(arr.copy()).permute(2, 0, 1)), "class_labels": torch.tensor(label)}


def shard_paths(root: str | Path, index: int) -> tuple[Path, Path]:
    """The moments and labels files of latent shard `index` (the labels file is written last: it marks the shard
    done)."""
    root = Path(root)
    return root / f"shard_{index:05d}.moments.npy", root / f"shard_{index:05d}.labels.npy"


def text_shard_paths(root: str | Path, index: int) -> tuple[Path, Path, Path]:
    """The text files of latent shard `index`: every caption's features (M, L, C), each row's captions as
    (start, count) into them (rows, 2), and the caption texts (a JSON list per row)."""
    root = Path(root)
    return (root / f"shard_{index:05d}.text.npy", root / f"shard_{index:05d}.caption_index.npy",
            root / f"shard_{index:05d}.captions.json")


EMPTY_TEXT = "empty_text.npy"  # the empty prompt's features (L, C): the null condition of text models


def read_latent_meta(root: str | Path) -> dict:
    """The `meta.json` of a latent dataset: VAE, scaling factor, latent shape, classes, shard count, and for
    text-to-image data the text encoder, its feature shape and storage dtype."""
    path = Path(root) / LATENT_META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data.root must be a folder written by scripts/extract_latents.py")
    return json.loads(path.read_text())


class LatentDataset(Dataset):
    """VAE moments written by `scripts/extract_latents.py`: `meta.json` plus memory-mapped `.npy` shards; with
    `--captions`, the text features of every caption too (`num_captions`, `caption_item`)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.root, self.meta = root, read_latent_meta(root)
        missing = [i for i in range(self.meta["num_shards"]) if not shard_paths(root, i)[1].is_file()]
        if missing:
            raise FileNotFoundError(
                f"{root} lacks {len(missing)} of {self.meta['num_shards']} shards (first: {missing[0]}): "
                "the extraction did not finish; run scripts/extract_latents.py again with the same --out to resume"
            )
        self.moments, self.labels, self.text, self.caption_index = [], [], [], []
        for i in range(self.meta["num_shards"]):
            moments, labels = shard_paths(root, i)
            self.moments.append(np.load(moments, mmap_mode="r"))
            self.labels.append(np.load(labels))
            if self.has_text:
                text, index, _ = text_shard_paths(root, i)
                self.text.append(np.load(text, mmap_mode="r"))
                self.caption_index.append(np.load(index))
        self.offsets = np.cumsum([0] + [len(x) for x in self.labels]).tolist()
        self.num_classes = len(self.meta["classes"])
        self.channels, self.resolution = self.meta["latent_channels"], self.meta["latent_size"]
        self.scale_factor = self.meta["scaling_factor"]

    @property
    def has_text(self) -> bool:
        """Whether the data holds text features (extracted with --captions)."""
        return bool(self.meta.get("text_encoder"))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.offsets, i) - 1
        return shard, i - self.offsets[shard]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        shard, j = self._locate(i)
        item = {"x": torch.from_numpy(np.array(self.moments[shard][j], dtype=np.float32))}
        if self.num_classes:
            item["class_labels"] = torch.tensor(int(self.labels[shard][j]))
        return item

    def num_captions(self, i: int) -> int:
        """How many captions item `i` has (its features are `caption_item(i, 0 … n − 1)`)."""
        shard, j = self._locate(i)
        return int(self.caption_index[shard][j][1])

    def caption_item(self, i: int, k: int) -> dict[str, Tensor]:
        """Item `i` with the features of its caption `k` as `encoder_hidden_states` (L, C), float32."""
        shard, j = self._locate(i)
        start, count = (int(v) for v in self.caption_index[shard][j])
        if not 0 <= k < count:
            raise IndexError(f"item {i} has {count} captions, not {k + 1}")
        return {**self[i], "encoder_hidden_states": torch.from_numpy(np.array(self.text[shard][start + k],
                                                                              dtype=np.float32))}

    def captions(self, i: int) -> list[str]:
        """The caption texts of item `i`."""
        shard, j = self._locate(i)
        return json.loads(text_shard_paths(self.root, shard)[2].read_text())[j]

    def empty_text_features(self) -> Tensor:
        """The empty prompt's features (L, C) recorded by the extraction: the null condition."""
        return torch.from_numpy(np.load(self.root / EMPTY_TEXT).astype(np.float32))


class LabelCaptions(Dataset):
    """Captions written from class labels, in several phrasings: caption k of an item with label y is
    `templates[k // len(names[y])].format(names[y][k % len(names[y])])` (every template with every synonym).

    Makes a labelled dataset (digits, CIFAR-10, …) captioned, for text-to-image training on the CPU; items lose
    their `class_labels` (the text is the condition).
    """

    def __init__(self, dataset: Dataset, names: Sequence[Sequence[str]], templates: Sequence[str]) -> None:
        if len(names) != dataset.num_classes:
            raise ValueError(f"data.caption_names has {len(names)} entries but the data has {dataset.num_classes} "
                             "classes: give one list of names per class")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"data.caption_templates={list(templates)}: give templates with one {{}} each")
        if any(not n for n in names):
            raise ValueError("data.caption_names: every class needs at least one name")
        self.dataset, self.names, self.templates = dataset, [list(n) for n in names], list(templates)
        self.num_classes, self.channels, self.resolution = 0, dataset.channels, dataset.resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def captions(self, i: int) -> list[str]:
        """Every caption of item `i`."""
        names = self.names[int(self.dataset[i]["class_labels"])]
        return [t.format(n) for t in self.templates for n in names]

    def num_captions(self, i: int) -> int:
        return len(self.templates) * len(self.names[int(self.dataset[i]["class_labels"])])

    def caption_item(self, i: int, k: int) -> dict[str, Any]:
        """Item `i` with its caption `k` as text."""
        item = self.dataset[i]
        names = self.names[int(item["class_labels"])]
        return {"x": item["x"], "caption": self.templates[k // len(names)].format(names[k % len(names)])}


def caption_source(dataset: Dataset, i: int) -> tuple[Dataset, int]:
    """The captioned dataset under `Subset` wrappers and item `i`'s index in it."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    if not hasattr(dataset, "caption_item"):
        raise TypeError(f"{type(dataset).__name__} has no captions")
    return dataset, i


def is_captioned(dataset: Dataset) -> bool:
    """Whether `dataset` (under any `Subset` wrappers) gives captions or their features."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return hasattr(dataset, "caption_item") and getattr(dataset, "has_text", True)


class CaptionDraw(Dataset):
    """One caption per draw of a captioned dataset, indexed by `(index, position)` as `GlobalBatchSampler(...,
    positions=True)` yields them: the caption is drawn uniformly from a generator seeded by (seed, position),
    the sample's place in the global data stream, so it depends on neither workers, processes nor restarts."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        i, position = key
        source, j = caption_source(self.dataset, i)
        generator = torch.Generator().manual_seed(hash((self.seed, int(position))) & (2**63 - 1))
        k = int(torch.randint(source.num_captions(j), (1,), generator=generator))
        return source.caption_item(j, k)


def sample_latents(moments: Tensor, scale_factor: float, eps: Tensor) -> Tensor:
    """A latent drawn from stored VAE moments: (mean + std·eps) · scale_factor (logvar clamped as in diffusers)."""
    mean, logvar = moments.chunk(2, dim=1)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * scale_factor


def build_dataset(cfg: Mapping) -> Dataset:
    """The dataset that a `data` config group describes (see conf/data/); checks it against the config."""
    kind = cfg["kind"]
    if kind == "digits":
        dataset = ArrayDataset(*load_digits_arrays(), resolution=cfg["resolution"])
    elif kind == "cifar10":
        from torchvision.datasets import CIFAR10

        raw = CIFAR10(str(cfg["root"]), train=cfg.get("split", "train") == "train", download=cfg["download"])
        dataset = ArrayDataset(raw.data, np.asarray(raw.targets), resolution=cfg["resolution"])
    elif kind == "npz":
        images, labels = load_npz_arrays(cfg["path"], cfg.get("split"))
        dataset = ArrayDataset(images, labels, resolution=cfg["resolution"], name=f"data.path={cfg['path']}")
    elif kind == "folder":
        dataset = ClassFolderDataset(cfg["root"], cfg["resolution"])
    elif kind == "latents":
        dataset = LatentDataset(cfg["root"])
    elif kind == "captions":
        fmt = cfg.get("format")
        if fmt == "coco":
            dataset = CaptionedImageDataset.from_coco(cfg["root"], cfg.get("split") or "train2014", cfg["resolution"])
        elif fmt == "folder":
            dataset = CaptionedImageDataset.from_folder(cfg["root"], cfg["resolution"])
        else:
            raise ValueError(f"data.format={fmt!r}: choose one of {CAPTION_FORMATS} (MS-COCO as downloaded, or a "
                             "folder with a metadata.jsonl)")
    else:
        raise ValueError(f"unknown data.kind {kind!r}; choose one of {DATA_KINDS}")
    if cfg.get("caption_templates"):  # captions written from the labels: a labelled dataset becomes captioned
        dataset = LabelCaptions(dataset, cfg.get("caption_names") or [], cfg["caption_templates"])
    check_dataset(dataset, cfg)
    if cfg.get("val_split") == "holdout" and cfg.get("holdout"):
        dataset = torch.utils.data.Subset(dataset, holdout_split(len(dataset), int(cfg["holdout"]))[0])
    if cfg.get("max_images"):
        dataset = torch.utils.data.Subset(dataset, range(min(int(cfg["max_images"]), len(dataset))))
    return dataset


def evenly_spaced(num_items: int, num: int) -> list[int]:
    """`num` distinct indices spread evenly over `range(num_items)` (first and last included), so a subset of a
    class-sorted set stays balanced."""
    if not 0 < num <= num_items:
        raise ValueError(f"cannot pick {num} of {num_items} items")
    return np.linspace(0, num_items - 1, num).round().astype(int).tolist()


def holdout_split(num_items: int, holdout: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): `holdout` evenly spaced items held out of `range(num_items)`."""
    if not 0 < holdout < num_items:
        raise ValueError(f"data.holdout={holdout} must be between 1 and {num_items - 1}, the data's size - 1")
    held = evenly_spaced(num_items, holdout)
    kept = np.setdiff1d(np.arange(num_items), held).tolist()
    return kept, held


def build_validation_dataset(cfg: Mapping) -> Dataset:
    """The held-out images of a `data` config for the validation loss, by `val_split`:

    "test": the data's test split: CIFAR-10's test set, an .npz's `x_test` (with `y_test`) beside the
    training array, MS-COCO's `val_split_name` (val2014) beside its training split, or for latents the folder
    `val_root` (e.g. val2014 extracted like the training set); "holdout": the `holdout` items that `build_dataset`
    keeps out of training. Neither is ever trained on: a config that would train on its own test split is refused.
    """
    split, kind = cfg.get("val_split", "test"), cfg["kind"]
    if split not in VAL_SPLITS:
        raise ValueError(f"data.val_split={split!r}: choose one of {VAL_SPLITS}")
    if split == "holdout":
        if not cfg.get("holdout"):
            raise ValueError("data.val_split=holdout needs data.holdout=N, the number of items held out of training")
        full = build_dataset({**cfg, "val_split": None, "max_images": None})
        return torch.utils.data.Subset(full, holdout_split(len(full), int(cfg["holdout"]))[1])
    if cfg.get("split", "train") == "test":
        raise ValueError(f"data={kind} trains on its test split (data.split=test), which data.val_split=test would "
                         "validate on: train on data.split=train or set data.val_split=holdout")
    if kind == "cifar10":
        return build_dataset({**cfg, "split": "test", "val_split": None, "max_images": None})
    if kind == "npz":
        path, key = split_npz_spec(cfg["path"])
        if key is not None and (not key.startswith("x_") or key == "x_test"):
            raise ValueError(f"data.path={cfg['path']} names the array {key!r}, beside which there is no other x_test "
                             "to validate on: set data.val_split=holdout and data.holdout=N")
        dataset = ArrayDataset(*load_npz_arrays(f"{path}:x_test"), resolution=cfg["resolution"], name=f"{path}:x_test")
        check_dataset(dataset, cfg)
        return dataset
    if kind == "latents" and cfg.get("val_root"):
        if str(cfg["val_root"]) == str(cfg["root"]):
            raise ValueError(f"data.val_root={cfg['val_root']} is the training data: give the held-out latents")
        return build_dataset({**cfg, "root": cfg["val_root"], "val_split": None, "max_images": None})
    if kind == "captions" and cfg.get("format") == "coco":
        test = cfg.get("val_split_name") or "val2014"
        if test == (cfg.get("split") or "train2014"):
            raise ValueError(f"data.split={test} is also the validation split: set data.val_split_name to another")
        return build_dataset({**cfg, "split": test, "val_split": None, "max_images": None})
    raise ValueError(f"data={kind} has no test split: set data.val_split=holdout and data.holdout=N (N items held "
                     "out of training for the validation loss), or val.every=0")


def check_dataset(dataset: Dataset, cfg: Mapping) -> None:
    """Raise if what the data holds differs from what the config (and hence the model) declares."""
    where = f"data={cfg['kind']} ({cfg.get('root') or cfg.get('path') or 'built in'})"
    found_fields = {"channels": dataset.channels, "resolution": dataset.resolution, "num_classes": dataset.num_classes}
    if isinstance(dataset, LatentDataset):
        # (data.scale_factor may differ from the VAE's own: U-ViT trains SD latents at 0.23010, not 0.18215.)
        if dataset.has_text:  # features made by one encoder train only a model of that encoder's width
            meta, encoder = dataset.meta, cfg.get("text_encoder")
            if encoder and str(encoder) != meta["text_encoder"]:
                raise ValueError(f"{where} holds text features of {meta['text_encoder']} but data.text_encoder="
                                 f"{encoder}: extract the features with that encoder, or set "
                                 f"data.text_encoder={meta['text_encoder']} (or null)")
            found_fields.update(text_dim=meta["text_dim"], num_text_tokens=meta["num_text_tokens"])
    for field, found in found_fields.items():
        if found != cfg[field]:
            raise ValueError(f"{where} has {field} {found} but the config says {cfg[field]}: set data.{field}={found}")


class GlobalBatchSampler(Sampler[int]):
    """Endless indices for one rank: the global stream of epoch-wise permutations, cut into global batches.

    Position p of the stream is `perm(epoch = p // N)[p % N]` with the permutation seeded by (seed, epoch);
    each global micro-batch of `global_batch` positions is split into `world_size` contiguous slices.
    The batches therefore depend on neither the number of processes nor restarts: a run resumed at
    stream position `start` (images seen so far) sees exactly the data an uninterrupted run would. With
    `positions=True` it yields `(index, position)`, the key `CaptionDraw` draws a sample's caption from.
    """

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start: int = 0, positions: bool = False) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_items, self.global_batch, self.seed, self.start = num_items, global_batch, seed, start
        self.positions = positions
        self.local = global_batch // world_size
        self.offset = rank * self.local

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self):
        epoch, perm = -1, None
        base = self.start
        while True:
            for p in range(base + self.offset, base + self.offset + self.local):
                if p // self.num_items != epoch:
                    epoch = p // self.num_items
                    perm = self._permutation(epoch)
                index = int(perm[p % self.num_items])
                yield (index, p) if self.positions else index
            base += self.global_batch
