"""Provenance records: what made a training run or a sample set, and how two records differ.

A training checkpoint records the settings that define its training (`train_setup.training_definition`, written by
`uvit_cog.checkpoints.save_checkpoint` as `provenance.json`); a sample set records the model it came from and
its sampling settings (`uvit_cog.sampling`, `sample_set.json`). Both are flat or nested JSON; a resume or an
addition compares the record with what would be done now and refuses when they differ, listing every difference
(`differences`, `describe_differences`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def as_json(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists, numpy scalars numbers, keys strings), so a record
    written to disk compares equal to the same record computed in memory."""
    return json.loads(json.dumps(value, default=str))


def flatten(record: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: {"a": {"b": 1}} → {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old: Mapping, new: Mapping, *, strict: bool = False) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (old, new) for every key whose values differ after a JSON round trip. A key only one record
    has is skipped (a record written before that key existed cannot say), or with `strict` compared as None."""
    old, new = flatten(as_json(old)), flatten(as_json(new))
    keys = old.keys() | new.keys() if strict else old.keys() & new.keys()
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def describe_differences(diffs: Mapping[str, tuple[Any, Any]], then: str, now: str) -> str:
    """One line per difference: `key: OLD (then) → NEW (now)`."""
    return "\n".join(f"  {key}: {old!r} ({then}) → {new!r} ({now})" for key, (old, new) in diffs.items())


def model_sha256(*parts: nn.Module | object | None) -> str:
    """SHA-256 of what a model computes with: each module's config (diffusers models' and transformers models';
    keys not starting with "_", no library version) and its state dict (names, dtypes, shapes, bytes), and each
    tokenizer's vocabulary. Equal weights of another attention kind differ by their config; the same weights cast
    to float16 differ by their bytes, as their images do; another text encoder or tokenizer is another model."""
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, nn.Module):  # a tokenizer: the ids it gives each piece of text
            digest.update(json.dumps(part.get_vocab(), sort_keys=True).encode())
            continue
        config = getattr(part, "config", {})
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(as_json(config), sort_keys=True).encode())
        for name, tensor in sorted(part.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
