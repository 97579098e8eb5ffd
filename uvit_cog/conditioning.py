"""Conditioning as one concept: what a model is conditioned on, carried as named fields from the dataset item,
through condition dropout and the loss, to the backbone's forward and the pipelines' guidance.

    kind    field (backbone keyword)   value                                   its null value (unconditional)
    none    —                          —                                       —
    class   class_labels               (B,) int64 in [0, num_classes)          the null label num_classes
    text    encoder_hidden_states      (B, L, C) text features (CLIP: 77×768)  the empty prompt's features

A condition is a plain dict `{field: tensor}` (empty for unconditional models), so every function here works
for every kind: training replaces rows by the null value with `drop_condition` (classifier-free guidance's
condition dropout; U-ViT's p_uncond), pipelines batch the conditional and the null halves with
`cat_conditions`. A new kind of condition adds a row to `FIELDS` (and
its tokens to the backbone), not branches here. Which kind a backbone takes: `uvit_cog.backbones.condition_kind`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Condition = dict[str, Tensor]

# Condition kind -> the backbone keyword argument that carries it.
FIELDS: dict[str, str | None] = {"none": None, "class": "class_labels", "text": "encoder_hidden_states"}


def condition_field(kind: str) -> str | None:
    """The backbone keyword argument of condition `kind` (None for unconditional models)."""
    if kind not in FIELDS:
        raise ValueError(f"unknown condition kind {kind!r}; choose one of {sorted(FIELDS)}")
    return FIELDS[kind]


def null_class_condition(num_classes: int, batch_size: int, device: torch.device | str | None = None) -> Condition:
    """The null condition of a class-conditional model: every row the null label `num_classes`."""
    return {"class_labels": torch.full((batch_size,), num_classes, dtype=torch.long, device=device)}


def batch_size_of(condition: Mapping[str, Tensor]) -> int | None:
    """The rows of a condition (None when it has no field); all fields must agree."""
    sizes = {name: len(value) for name, value in condition.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"condition fields disagree on the batch size: {sizes}")
    return next(iter(sizes.values()), None)


def drop_condition(condition: Mapping[str, Tensor], drop: Tensor, null: Mapping[str, Tensor]) -> Condition:
    """`condition` with the rows where `drop` (B,) is True replaced by `null` (one row, or B rows, per field).

    Condition dropout for classifier-free guidance: the model learns the unconditional prediction from the
    same null value the sampler later gives it (null label; empty prompt's features).
    """
    if condition.keys() != null.keys():
        raise ValueError(f"condition fields {sorted(condition)} but null fields {sorted(null)}")
    out = {}
    for name, value in condition.items():
        filler = null[name].to(device=value.device, dtype=value.dtype).expand_as(value)
        out[name] = torch.where(drop.to(value.device).reshape(-1, *[1] * (value.dim() - 1)), filler, value)
    return out


def cat_conditions(*conditions: Mapping[str, Tensor]) -> Condition:
    """Conditions stacked along the batch, field by field (e.g. the conditional and the null half of guidance)."""
    fields = {frozenset(c) for c in conditions}
    if len(fields) > 1:
        raise ValueError(f"cannot stack conditions of different fields: {[sorted(c) for c in conditions]}")
    return {name: torch.cat([c[name] for c in conditions]) for name in conditions[0]} if conditions else {}


def condition_to(condition: Mapping[str, Tensor], device: torch.device | str,
                 dtype: torch.dtype | None = None) -> Condition:
    """The condition on `device`; floating-point fields (text features) also cast to `dtype` if given."""
    return {name: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
            for name, value in condition.items()}


__all__ = ["Condition", "FIELDS", "batch_size_of", "cat_conditions", "condition_field", "condition_to",
           "drop_condition", "null_class_condition"]
