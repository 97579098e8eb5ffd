"""Training datasets: scikit-learn digits, CIFAR-10, `.npz` arrays, class folders, VAE latents.

The files themselves are read by `uvit_cog.images` (the one `.npz` syntax `FILE.npz:KEY`, the class-folder
layout, image decoding); this module turns them into training samples.

Every dataset returns `(x, label)`: pixel datasets give float images (C, H, W) in [-1, 1], the latent
dataset gives the stored VAE moments (2C, h, w) = [mean, logvar], turned into a latent sample by
`sample_latents` in the training step (so the noise comes from the training step's seeded generator).
Random flips are drawn in the training step for the same reason; datasets are deterministic.
Labels are int64; a dataset without labels returns 0 and has `num_classes = 0`.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .images import as_nhwc, class_folder_items, load_npz_arrays, open_rgb, split_npz_spec

DATA_KINDS = ("digits", "cifar10", "npz", "folder", "latents")  # folder: a class folder, root/<class>/<image>
# Where the held-out images of the validation loss come from: the data's own test split (CIFAR-10's, an .npz's
# x_test), or `holdout` items that `build_dataset` keeps out of training.
VAL_SPLITS = ("test", "holdout")
LATENT_META = "meta.json"


def to_unit_range(images: Tensor) -> Tensor:
    """uint8 images to float in [-1, 1], the range every model here is trained on."""
    return images.float().div(127.5).sub(1.0)


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

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return to_unit_range(self.images[i]), self.labels[i]


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

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path, label = self.items[i]
        arr = center_crop_arr(open_rgb(path), self.resolution)
        return to_unit_range(torch.from_numpy(arr.copy()).permute(2, 0, 1)), torch.tensor(label)


def shard_paths(root: str | Path, index: int) -> tuple[Path, Path]:
    """The moments and labels files of latent shard `index`."""
    root = Path(root)
    return root / f"shard_{index:05d}.moments.npy", root / f"shard_{index:05d}.labels.npy"


def read_latent_meta(root: str | Path) -> dict:
    """The `meta.json` of a latent dataset: VAE, scaling factor, latent shape, classes, shard count."""
    path = Path(root) / LATENT_META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data.root must be a folder written by scripts/extract_latents.py")
    return json.loads(path.read_text())


class LatentDataset(Dataset):
    """VAE moments written by `scripts/extract_latents.py`: `meta.json` plus memory-mapped `.npy` shards."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.meta = read_latent_meta(root)
        missing = [i for i in range(self.meta["num_shards"]) if not shard_paths(root, i)[1].is_file()]
        if missing:
            raise FileNotFoundError(
                f"{root} lacks {len(missing)} of {self.meta['num_shards']} shards (first: {missing[0]}): "
                "the extraction did not finish; run scripts/extract_latents.py again with the same --out to resume"
            )
        self.moments, self.labels = [], []
        for i in range(self.meta["num_shards"]):
            moments, labels = shard_paths(root, i)
            self.moments.append(np.load(moments, mmap_mode="r"))
            self.labels.append(np.load(labels))
        self.offsets = np.cumsum([0] + [len(x) for x in self.labels]).tolist()
        self.num_classes = len(self.meta["classes"])
        self.channels, self.resolution = self.meta["latent_channels"], self.meta["latent_size"]
        self.scale_factor = self.meta["scaling_factor"]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        shard = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[shard]
        return torch.from_numpy(np.array(self.moments[shard][j], dtype=np.float32)), torch.tensor(
            int(self.labels[shard][j])
        )


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
    else:
        raise ValueError(f"unknown data.kind {kind!r}; choose one of {DATA_KINDS}")
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
    training array; "holdout": the `holdout` items that `build_dataset` keeps out of training. Neither is ever
    trained on: a config that would train on its own test split is refused.
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
    raise ValueError(f"data={kind} has no test split: set data.val_split=holdout and data.holdout=N (N items held "
                     "out of training for the validation loss), or val.every=0")


def check_dataset(dataset: Dataset, cfg: Mapping) -> None:
    """Raise if what the data holds differs from what the config (and hence the model) declares."""
    where = f"data={cfg['kind']} ({cfg.get('root') or cfg.get('path') or 'built in'})"
    found_fields = {"channels": dataset.channels, "resolution": dataset.resolution, "num_classes": dataset.num_classes}
    if isinstance(dataset, LatentDataset):
        found_fields["scale_factor"] = dataset.scale_factor
    for field, found in found_fields.items():
        if found != cfg[field]:
            raise ValueError(f"{where} has {field} {found} but the config says {cfg[field]}: set data.{field}={found}")


class GlobalBatchSampler(Sampler[int]):
    """Endless indices for one rank: the global stream of epoch-wise permutations, cut into global batches.

    Position p of the stream is `perm(epoch = p // N)[p % N]` with the permutation seeded by (seed, epoch);
    each global micro-batch of `global_batch` positions is split into `world_size` contiguous slices.
    The batches therefore depend on neither the number of processes nor restarts: a run resumed at
    stream position `start` (images seen so far) sees exactly the data an uninterrupted run would.
    """

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_items, self.global_batch, self.seed, self.start = num_items, global_batch, seed, start
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
                yield int(perm[p % self.num_items])
            base += self.global_batch
