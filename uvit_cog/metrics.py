"""Sample-quality metrics (FID, KID, IS, precision/recall) through torch-fidelity: images or statistics in,
numbers out.

torch-fidelity supplies the feature extractor (built by `uvit_cog.inception`) and the metric definitions; this
module adds what it lacks: inputs torch-fidelity does not read (`.npz` arrays and flat folders, through
`uvit_cog.images`; statistics files with `mu` and `sigma`, e.g. U-ViT's and ADM's published `fid_stats_*.npz`),
reference statistics saved once and reused, and a JSON-ready record with its table. It never samples a model:
`uvit_cog.sampling.sample_and_evaluate` generates a sample set, then measures it here.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from tqdm.auto import tqdm

from .checks import check_output_file
from .images import image_source_kind, load_images, npz_image_key, open_npz, split_npz_spec
from .inception import NO_LOGITS, InceptionWeights, create_inception, resolve_weights
from .rundir import atomic_write, is_model_dir

METRICS = ("fid", "kid", "isc", "prc")
FEATURE_DIM = 2048  # the TF-Inception pool features that FID, KID and precision/recall are computed on
UNAVAILABLE = "unavailable"
ISC_SPLITS, PRC_NEIGHBORHOOD = 10, 3  # torch-fidelity's defaults


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


def statistics_path(path: str | Path) -> Path:
    """Where `save_statistics` writes `path`: with `.npz` appended when it lacks it, as `np.savez` does."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def save_statistics(path: str | Path, stats: Statistics) -> Path:
    """Write `mu`, `sigma` (the layout of published `fid_stats_*.npz`), the image count and provenance,
    atomically, to `statistics_path(path)`. Returns the file written."""
    path = statistics_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {f"meta_{k}": np.asarray(str(v)) for k, v in stats.meta.items()}
    with atomic_write(path) as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, num_images=np.asarray(stats.num_images or -1), **meta)
    return path


def load_statistics(path: str | Path) -> Statistics:
    """Read statistics saved by `save_statistics`, or a published `fid_stats_*.npz` / ADM reference batch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"statistics file {path} not found: make one with `python eval/score.py input=IMAGES save_stats={path}`"
        )
    with open_npz(path) as data:
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


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def input_kind(spec: str | Path) -> str:
    """What an input string names: `statistics` (an .npz with mu and sigma, no `:KEY`), `model` (a pipeline or
    training-run directory, see `uvit_cog.rundir.is_model_dir`), else an image source (`uvit_cog.images`):
    `dataset`, `npz` or `folder`."""
    kind = image_source_kind(spec)
    path, key = split_npz_spec(spec)
    if kind == "npz" and key is None:
        with open_npz(path) as data:
            return "statistics" if {"mu", "sigma"} <= set(data.files) else "npz"
    return "model" if kind == "folder" and is_model_dir(path) else kind


class Reference(NamedTuple):
    """A checked and loaded reference: its spec and kind for the record, and the statistics or images."""

    spec: str | None
    kind: str | None
    data: Statistics | Dataset | None


def check_reference_statistics(stats: Statistics, spec: str) -> Statistics:
    """Refuse reference statistics of other features than the 2048-d Inception pool the input is measured with."""
    if stats.mu.shape[0] != FEATURE_DIM:
        raise ValueError(
            f"reference={spec}: statistics of {stats.mu.shape[0]}-d features, but the input is measured on the "
            f"{FEATURE_DIM}-d TF-Inception pool features: make the reference with `python eval/score.py "
            "input=IMAGES save_stats=FILE.npz` (or use a published fid_stats_*.npz)"
        )
    return stats


def check_reference(reference: str | Path) -> str:
    """Check a reference spec without loading its images (for entry points, before any work): it exists, is no
    model, and statistics hold 2048-d `mu`/`sigma`. Returns its kind (`input_kind`)."""
    kind = input_kind(reference)
    if kind == "model":
        raise ValueError(f"reference={reference} is a model directory: sample it first, or give images or statistics")
    if kind == "statistics":
        check_reference_statistics(load_statistics(reference), str(reference))
    if kind == "npz":  # an image array is there (statistics under other names are not taken for images)
        path, key = split_npz_spec(reference)
        with open_npz(path) as data:
            npz_image_key(data, path, key)
    return kind


def load_reference(reference: str | Path | np.ndarray | Dataset | Statistics | Reference | None) -> Reference:
    """Check and load a reference (statistics file or `Statistics`, images of any `load_images` kind, or
    None) before any work; a model directory is refused (it has to be sampled first)."""
    if isinstance(reference, Reference):
        return reference
    if reference is None:
        return Reference(None, None, None)
    if isinstance(reference, Statistics):
        return Reference("<Statistics>", "statistics", check_reference_statistics(reference, "<Statistics>"))
    if not isinstance(reference, str | Path):
        return Reference(f"<{type(reference).__name__}>", "array", load_images(reference))
    kind = check_reference(reference)
    data = load_statistics(reference) if kind == "statistics" else load_images(reference)
    return Reference(str(reference), kind, data)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


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


def check_metric_names(metrics: Sequence[str]) -> None:
    """Raise naming any metric not in `METRICS`."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")


def compute_metrics(
    source: str | Path | np.ndarray | Dataset,
    reference: str | Path | np.ndarray | Dataset | Statistics | Reference | None = None,
    *,
    metrics: Sequence[str] = METRICS,
    weights: str | Path | InceptionWeights = "auto",
    num_samples: int | None = None,
    batch_size: int = 50,
    device: str = "auto",
    seed: int = 0,
    kid_subset_size: int = 1000,
    save_stats: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate images (flat folder, `.npz`, torch-fidelity dataset name, uint8 array, Dataset) against a
    reference (the same kinds, or statistics). `num_samples`: that many evenly spaced input images.

    Inputs are checked before any work; a model directory is refused (`uvit_cog.sampling.sample_and_evaluate`
    samples it, then calls this). Returns a JSON-ready record: metric values (torch-fidelity's keys,
    "unavailable" with a reason where they cannot be computed), image counts, reference, seed, weights and
    timings; `sampler` is None here (sample_and_evaluate fills it).
    """
    check_metric_names(metrics)
    if isinstance(source, str | Path):
        spec, kind = str(source), input_kind(source)
    else:
        spec, kind = f"<{type(source).__name__}>", "array"
    if kind == "statistics":
        raise ValueError(f"{source}: a statistics file can only be the reference")
    if kind == "model":
        raise ValueError(
            f"{source} is a model directory: sample it first (eval/score.py input=MODEL num_samples=N does, "
            "or uvit_cog.sampling.sample_and_evaluate)"
        )
    if save_stats:
        check_output_file("save_stats", statistics_path(save_stats), (".npz",))
    images = load_images(source, num_samples)
    ref = load_reference(reference)

    device = resolve_device(device)
    weights = weights if isinstance(weights, InceptionWeights) else resolve_weights(weights)
    layers = ["2048"] + (["logits_unbiased"] if "isc" in metrics and weights.has_logits else [])
    extractor = create_inception(weights, layers, device)
    record = {
        "input": {"spec": spec, "kind": kind},
        "reference": {"spec": ref.spec, "kind": ref.kind},
        "sampler": None,
        "seed": seed,
        "device": device,
        "batch_size": batch_size,
        "weights": asdict(weights) | {"extractor": weights.extractor},
        "torch_fidelity": torch_fidelity.__version__,
        "timing_s": {},
    }
    features, record["timing_s"]["input_features"] = extract_features(images, extractor, batch_size, "input", progress)
    record["input"]["num_images"] = len(images)
    record["input_images_per_s"] = len(images) / record["timing_s"]["input_features"]
    if save_stats:
        stats = Statistics.from_features(features["2048"], source=spec, weights=weights.source)
        record["input"]["saved_stats"] = str(save_statistics(save_stats, stats))

    reference = ref.data
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
