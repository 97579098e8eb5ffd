"""The backbones this toolkit trains, by name: each a builder with explicit arguments and its published sizes.

    name   builder                   presets                        sizes
    uvit   UViTModel(**kwargs)       uvit_cog.model.PRESETS          U-ViT-S ... U-ViT-H (Bao et al. 2022)
    dit    uvit_cog.dit.build_dit    uvit_cog.dit.DIT_PRESETS        DiT-S/2 ... DiT-XL/8 (Peebles & Xie 2023)

train.py maps its `model` config group onto these (`backbone_arguments`, `build_backbone`); the pipelines and the
training loop call every backbone the same way, `model(x, t, **condition).sample`, with the condition as named
fields (`uvit_cog.conditioning`): `class_labels` in [0, num_classes] (`num_classes` the null label), or
`encoder_hidden_states` for text-conditional U-ViTs (DiT is class-conditional only), or nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffusers.models.modeling_utils import ModelMixin

from .dit import DIT_PRESETS, build_dit, dit_fields
from .model import PRESETS, UViTModel


@dataclass(frozen=True)
class Backbone:
    """A trainable backbone: its builder (explicit keyword arguments), its named sizes, the condition kinds
    (`uvit_cog.conditioning`) it can take, and how the fields of an earlier model description map onto the
    builder's arguments (`upgrade`; the identity where none changed)."""

    build: Callable[..., ModelMixin]
    presets: Mapping[str, Mapping[str, Any]]
    conditions: tuple[str, ...]
    upgrade: Callable[[Mapping[str, Any]], dict[str, Any]] = dict


BACKBONES: dict[str, Backbone] = {
    "uvit": Backbone(build=UViTModel, presets=PRESETS, conditions=("none", "class", "text")),
    "dit": Backbone(build=build_dit, presets=DIT_PRESETS, conditions=("none", "class"), upgrade=dit_fields),
}
DEFAULT_BACKBONE = "uvit"  # model configs without a `backbone` field (every U-ViT config, runs saved before DiT)


def backbone_arguments(fields: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(backbone name, builder arguments) of a model description: its preset's sizes under the fields given.

    `fields` holds `backbone` (default "uvit"), `preset` (a name of that backbone's presets, or None) and the
    builder's arguments; a field that is None takes the preset's value (or the builder's default). A description
    saved by an earlier version gives the arguments that build the same model (`Backbone.upgrade`).
    """
    kwargs = {k: v for k, v in fields.items() if v is not None}
    name = kwargs.pop("backbone", DEFAULT_BACKBONE)
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r}: choose one of {sorted(BACKBONES)}")
    preset = kwargs.pop("preset", None)
    presets = BACKBONES[name].presets
    if preset is not None and preset not in presets:
        raise ValueError(f"preset={preset!r} is no {name} size: choose one of {sorted(presets)} or null (sizes given)")
    return name, BACKBONES[name].upgrade({**presets.get(preset, {}), **kwargs})


def with_defaults(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with every argument of backbone `name`'s builder that they leave out at its default: the model
    they build, spelled out (so a config saved before an argument existed compares equal to one that has it)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r}: choose one of {sorted(BACKBONES)}")
    defaults = {p.name: p.default for p in inspect.signature(BACKBONES[name].build).parameters.values()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **kwargs}


def build_backbone(name: str, **kwargs: Any) -> ModelMixin:
    """A freshly initialised backbone `name` built from explicit arguments (see `backbone_arguments`)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r}: choose one of {sorted(BACKBONES)}")
    if kwargs.get("text_dim") and "text" not in BACKBONES[name].conditions:
        raise ValueError(f"backbone={name} is not text-conditional (it takes {BACKBONES[name].conditions}): train "
                         "text-to-image models with backbone=uvit, or set text_dim=0")
    kwargs = {k: v for k, v in kwargs.items() if k != "text_dim" or v}  # text_dim=0 means "no text": any backbone
    return BACKBONES[name].build(**kwargs)


def num_classes(config: Mapping[str, Any]) -> int:
    """Real classes of a backbone's config (0 = unconditional); label `num_classes` is the null label.

    UViTModel stores `num_classes`; DiT (`DiTModel` and diffusers' own `DiTTransformer2DModel`) the size of its
    label table without the null row, `num_embeds_ada_norm`, whose null label is that number too.
    """
    value = config.get("num_classes", config.get("num_embeds_ada_norm"))
    if value is None:
        raise ValueError("the model config has neither num_classes (UViTModel) nor num_embeds_ada_norm (DiT): "
                         "not a backbone of this toolkit")
    return int(value)


def condition_kind(config: Mapping[str, Any]) -> str:
    """The condition kind of a backbone's config: "class" (real classes > 0), "text" (a U-ViT with text_dim > 0)
    or "none" — the one place that reads it off a config (`uvit_cog.conditioning` for what each kind carries)."""
    if config.get("text_dim"):
        return "text"
    return "class" if num_classes(config) else "none"


__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "Backbone", "backbone_arguments", "build_backbone", "condition_kind",
           "num_classes", "with_defaults"]
