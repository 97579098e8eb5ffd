"""`set_attention`: any attention kind of this toolkit inside any diffusers transformer, and inside `UViTModel`.

diffusers' transformers compute attention in *processors*. The legacy ones (DiT, PixArt, SD3, ...) call
`F.scaled_dot_product_attention` on (B, H, N, D) tensors; the newer ones (Flux, Wan, LTX, ...) call
`dispatch_attention_fn` on (B, N, H, D) tensors. Everything else a processor does (q/k/v and added-KV
projections, qk-norm, RoPE, joint text+image attention, masks, output projections) happens around that one
call. So instead of copying diffusers' processors, `set_attention` gives each chosen attention module a copy
of *its own* processor whose methods run with those two names rebound: the processor's code is unchanged,
only the attention call computes the chosen kind (`uvit_cog.attention`) in the processor's layout.

The rebinding is a new function object with the same code and a copy of its module's globals in which
`F` (torch.nn.functional) is a view whose `scaled_dot_product_attention` is ours and `dispatch_attention_fn`
is ours; module-level helpers that compute attention are rebound the same way. No global state is patched:
other layers, other models and other threads are untouched. A processor whose code computes attention some
other way (e.g. diffusers' `AttnProcessor`, plain matmuls) is refused at install time.

The choice is recorded in the model config (key `uvit_cog_attention`), so `save_pretrained` stores it and
`load_model` restores it; diffusers' own `from_pretrained` ignores the key with a warning that names it.
Layers are selected as everywhere in this toolkit (`uvit_cog.attention.select_layers`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import FrozenDict
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from . import attention as _attention
from .attention import complement, select_layers
from .model import UViTModel

CONFIG_KEY = "uvit_cog_attention"
# The record's format. 2: `layers` is a selection of `select_layers`. Records without "format" (written before it
# existed) used "first_last" for every layer but the first and the last, "all_but_first_last" now.
RECORD_FORMAT = 2
# An additive float mask is binary if every entry is 0 (keep) or at most this (drop): exp(-1000) is 0 in
# every float dtype, so softmax with such a mask equals softmax with the bool mask exactly.
_DROP_BELOW = -1000.0
_LOAD_NOTE = "written by uvit_cog.set_attention: load with uvit_cog.load_model(path); diffusers' from_pretrained "
_LOAD_NOTE += "ignores this and gives the model's own softmax attention"


def attention_fn(kind: str) -> Callable[..., Tensor]:
    """The function of a parameter-free kind of `uvit_cog.attention.attention_variants` (q, k, v in (B, H, N, D),
    bool mask True = keep), or a ValueError saying why `kind` cannot run inside a diffusers processor."""
    spec = _attention.get_attention_kind(kind)
    if spec.has_parameters:
        raise ValueError(
            f"set_attention: kind {kind!r} has weights of its own ({_parameters_of(spec)}) that a diffusers attention "
            "module does not have and its checkpoints do not store; a processor only sees q, k and v. Choose one of "
            f"{sorted(_attention.attention_variants)}, or use UViTModel(attention_type={kind!r})."
        )
    return _attention.attention_variants[kind]


def _parameters_of(spec: _attention.AttentionKind) -> str:
    if spec.differential:
        return "split q/k maps, λ vectors and a per-head RMSNorm"
    return "an output gate σ(x W_g) computed from the layer input" if spec.gate else "a learned sink logit per head"


def keep_mask(attn_mask: Tensor | None) -> Tensor | None:
    """A bool keep-mask (True = keep) from diffusers' bool or additive float mask.

    Cog and the other kinds mask after their own transform of the scores, so an additive bias has no meaning
    for them; a float mask is accepted only if it is binary (0 = keep, <= -1000 or -inf = drop).
    """
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    if not attn_mask.is_floating_point():
        raise ValueError(f"set_attention: attention mask of dtype {attn_mask.dtype}; pass a bool or float mask")
    keep = attn_mask == 0
    if not bool((keep | (attn_mask <= _DROP_BELOW)).all()):
        raise ValueError(
            "set_attention: the attention mask is an additive float mask with values other than 0 (keep) and "
            f"<= {_DROP_BELOW:g} / -inf (drop); a bias added to the scores has no meaning under Cog's |s| or the "
            "other kinds. Pass a bool mask (True = keep) instead."
        )
    return keep


def _attend_like_sdpa(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> Tensor:
    """Attention of `kind` on (B, H, N, D) tensors with SDPA's arguments, converted to the kinds' conventions."""
    mask = keep_mask(attn_mask)
    if is_causal:  # SDPA's convention: top-left aligned lower triangle
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else mask & causal
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if torch.is_autocast_enabled(q.device.type):  # SDPA runs in the autocast dtype; so do the kinds
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dropout = {"dropout_p": dropout_p} if dropout_p > 0.0 else {}  # the registry's functions take it as a keyword
    return attention_fn(kind)(q, k, v, attn_mask=mask, scale=scale, **dropout)


class _Functional:
    """`torch.nn.functional` with `scaled_dot_product_attention` computing `kind`; every other name is F's."""

    def __init__(self, kind: str) -> None:
        self._kind = kind

    def scaled_dot_product_attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        return _attend_like_sdpa(self._kind, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


def _dispatch(kind: str) -> Callable[..., Tensor]:
    """`dispatch_attention_fn` computing `kind`: (B, N, H, D) in and out, as diffusers' backends."""

    def dispatch(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
    ) -> Tensor:
        if parallel_config is not None:
            raise NotImplementedError("set_attention: context-parallel attention is not supported by the kinds")
        if attention_kwargs:
            raise ValueError(f"set_attention: backend-specific attention_kwargs {sorted(attention_kwargs)} unsupported")
        # A (B, M) key mask, as diffusers' native backend broadcasts it.
        if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
            attn_mask = attn_mask[:, None, None, :]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return _attend_like_sdpa(kind, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa).transpose(1, 2)

    return dispatch


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name a code object and its nested functions refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


@functools.cache
def _attention_functions(module_name: str) -> frozenset[str]:
    """Names of the module-level functions of a module that compute attention, directly or through each other."""
    module_globals = sys.modules[module_name].__dict__
    own = {
        name: fn
        for name, fn in module_globals.items()
        if isinstance(fn, types.FunctionType) and fn.__globals__ is module_globals
    }
    found = {name for name, fn in own.items() if _computes_attention(fn.__code__, module_globals, frozenset())}
    while True:
        more = {name for name, fn in own.items() if name not in found and _names(fn.__code__) & found}
        if not more:
            return frozenset(found)
        found |= more


def _computes_attention(code: types.CodeType, module_globals: dict[str, Any], helpers: frozenset[str]) -> bool:
    """Whether code calls F.scaled_dot_product_attention, dispatch_attention_fn or an attention helper."""
    names = _names(code)
    for name in names:
        value = module_globals.get(name)
        if value is F and "scaled_dot_product_attention" in names:
            return True
        if value is dispatch_attention_fn or name in helpers:
            return True
    return False


@functools.cache
def _rerouted_globals(module_name: str, kind: str) -> dict[str, Any]:
    """A copy of a module's globals in which attention calls compute `kind` (one copy per module and kind).

    A snapshot: globals the module rebinds later (none of diffusers' processor modules does) are not seen.
    """
    original = sys.modules[module_name].__dict__
    rerouted = dict(original)
    for name, value in original.items():
        if value is F:
            rerouted[name] = _Functional(kind)
        elif value is dispatch_attention_fn:
            rerouted[name] = _dispatch(kind)
    for name in _attention_functions(module_name):
        rerouted[name] = _rebind(original[name], rerouted)
    return rerouted


def _rebind(fn: types.FunctionType, module_globals: dict[str, Any]) -> types.FunctionType:
    """fn with the same code, defaults and closure, reading its globals from module_globals."""
    new = types.FunctionType(fn.__code__, module_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__annotations__ = fn.__qualname__, fn.__doc__, fn.__annotations__
    return new


_BASES = {object, nn.Module}


@functools.cache
def _processor_class(cls: type, kind: str) -> type:
    """A subclass of a processor class whose attention-computing methods compute `kind`.

    Raises TypeError if no method of the class computes attention through SDPA or diffusers' dispatch.
    """
    methods: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass in _BASES:
            break
        for name, fn in vars(klass).items():
            if name in methods or not isinstance(fn, types.FunctionType):
                continue
            module_name = fn.__globals__["__name__"]
            if getattr(sys.modules.get(module_name), "__dict__", None) is not fn.__globals__:
                raise TypeError(f"set_attention: {cls.__name__}.{name} is not defined in an imported module")
            if _computes_attention(fn.__code__, fn.__globals__, _attention_functions(module_name)):
                methods[name] = _rebind(fn, _rerouted_globals(module_name, kind))
            else:
                methods[name] = fn  # keeps a subclass's own method from being shadowed by a rebound base one
    rebound = {name: fn for name, fn in methods.items() if fn is not getattr(cls, name, None)}
    if not rebound:
        raise TypeError(
            f"set_attention: processor {cls.__name__} computes attention without F.scaled_dot_product_attention or "
            "dispatch_attention_fn, so its attention cannot be routed to another kind. Install a processor that "
            "uses one of them first (e.g. diffusers' AttnProcessor2_0)."
        )
    rebound.update(_uvit_cog_kind=kind, _uvit_cog_base=cls, __module__=__name__)
    return type(f"{cls.__name__}[{kind}]", (cls,), rebound)


def _is_attention_module(module: nn.Module) -> bool:
    """diffusers' convention: an attention module calls its `processor` (Attention, FluxAttention, MochiAttention)."""
    return callable(getattr(module, "processor", None))


def _install(module: nn.Module, processor: Any) -> None:
    setter = getattr(module, "set_processor", None)  # MochiAttention has none
    if setter is not None:
        setter(processor)
    else:
        module.processor = processor


def attention_layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The layers `set_attention(layers=...)` indexes, in order: (layer name, names of its attention modules).

    A layer is a transformer block: the module path up to the first ModuleList index ("transformer_blocks.3"),
    so a block's self- and cross-attention share one kind. Order is registration order (e.g. Flux: the 19
    double-stream blocks, then the 38 single-stream ones). For UViTModel: in-blocks, mid-block, out-blocks.
    """
    if isinstance(model, UViTModel):
        names = [f"in_blocks.{i}" for i in range(len(model.in_blocks))] + ["mid_block"]
        names += [f"out_blocks.{i}" for i in range(len(model.out_blocks))]
        return [(name, [f"{name}.attn"]) for name in names]
    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if _is_attention_module(module):
            parts = name.split(".")
            cut = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
            layers.setdefault(".".join(parts[: cut + 1]), []).append(name)
    return list(layers.items())


def set_attention(
    model: nn.Module, kind: str = "cog", layers: str | Sequence[int] = "all_but_first_last"
) -> nn.Module:
    """Make the chosen layers of `model` compute attention of `kind`; every other layer keeps the model's own.

    Args:
        model: a diffusers `ModelMixin` (DiT, PixArt, SD3, Flux, Sana, ... transformers) or a `UViTModel`.
        kind: an attention kind of `uvit_cog.attention` ("cog", "softmax", and those of its registry).
        layers: which layers (see `attention_layers`) get `kind`: "all_but_first_last" (default, as U-ViC),
            "first_last" (the first and the last layer), "all", "none" (restore the model's own attention) or
            a list of indices (negative ones count from the end).

    Returns the model, changed in place. The call is declarative: a later call replaces an earlier one. The
    choice is stored in the model config so that `save_pretrained` + `load_model` restore it. For UViTModel it
    becomes the model's own `attention_type` / `softmax_layers`.

    Example:
        >>> model = FluxTransformer2DModel(...)
        >>> set_attention(model, "cog")  # Cog in every block but the first and the last
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_attention: model must be a torch module, got {type(model).__name__}")
    attention_fn(kind)  # validates kind before anything changes
    groups = attention_layers(model)
    if not groups:
        raise ValueError(f"set_attention: {type(model).__name__} has no attention modules with a processor")
    selected = select_layers(layers, len(groups), "set_attention: layers")
    layers = layers if isinstance(layers, str) else [int(i) for i in layers]  # plain JSON for the config
    if isinstance(model, UViTModel):
        return _set_uvit_attention(model, kind, selected, layers)
    modules = dict(model.named_modules())
    plan = [
        (modules[name], getattr(modules[name].processor, "_uvit_cog_original", modules[name].processor), i in selected)
        for i, (_, names) in enumerate(groups)
        for name in names
    ]
    for _, original, chosen in plan:  # refuse before changing anything
        if chosen:
            _processor_class(type(original), kind)
    for module, original, chosen in plan:
        _install(module, _routed_processor(original, kind) if chosen else original)
    if isinstance(model, ModelMixin):
        record = {"kind": kind, "layers": layers, "format": RECORD_FORMAT, "note": _LOAD_NOTE}
        _record(model, record if selected else None)
    return model


def _routed_processor(original: Any, kind: str) -> Any:
    """A shallow copy of `original` (sharing its weights, if any) of the class that computes `kind`."""
    routed = copy.copy(original)
    routed.__class__ = _processor_class(type(original), kind)
    routed._uvit_cog_original = original
    return routed


def _record(model: ModelMixin, value: dict[str, Any] | None) -> None:
    """Store (or, for None, remove) the attention choice in the model config that save_pretrained writes."""
    if value is not None:
        model.register_to_config(**{CONFIG_KEY: value})
    elif CONFIG_KEY in model.config:  # diffusers has no public way to drop a config key
        model._internal_dict = FrozenDict({k: v for k, v in model.config.items() if k != CONFIG_KEY})


def _set_uvit_attention(model: UViTModel, kind: str, selected: set[int], layers: str | Sequence[int]) -> UViTModel:
    """UViTModel carries its attention in its own config: set attention_type / softmax_layers and the blocks.

    Blocks switch kind in place, so only between kinds without weights of their own (a gate, a sink, diff's
    λ): those are built with the model, `UViTModel(attention_type=..., attention_layers=...)`.
    """
    blocks = model.blocks
    kinds = [kind if i in selected else "softmax" for i in range(len(blocks))]
    for i, block in enumerate(blocks):
        for name in (block.attn.kind.name, kinds[i]):
            if _attention.get_attention_kind(name).has_parameters:
                raise ValueError(
                    f"set_attention: UViTModel block {i} would change kind {block.attn.kind.name!r} -> {kinds[i]!r}, "
                    f"but {name!r} has weights of its own; build UViTModel(attention_type=..., attention_layers=...)"
                )
    if kind == "softmax" or not selected:
        config = {"attention_type": "softmax", "softmax_layers": "all"}
    else:
        config = {"attention_type": kind, "softmax_layers": complement(layers, len(blocks))}
    config["attention_layers"] = None
    for block, new in zip(blocks, kinds, strict=True):
        block.attn.kind = _attention.get_attention_kind(new)
    model.register_to_config(**config)
    return model


class _DropConfigKeyWarning(logging.Filter):
    """Hides diffusers' "config attributes ... not expected" warning about CONFIG_KEY while load_model handles it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"'{CONFIG_KEY}'" not in record.getMessage()


def load_model(path: str | Path, subfolder: str | None = None, **kwargs: Any) -> ModelMixin:
    """Load a saved diffusers model or UViTModel with the attention `set_attention` gave it before saving.

    Args:
        path: a model directory written by `save_pretrained` (config.json + weights).
        subfolder: the model's folder inside `path` (e.g. "transformer" in a pipeline directory).
        **kwargs: passed to the class's `from_pretrained` (e.g. torch_dtype).
    """
    config_path = Path(path, subfolder or "", "config.json")
    if not config_path.is_file():
        raise FileNotFoundError(f"load_model: no config.json at {config_path}; pass a save_pretrained directory")
    config = json.loads(config_path.read_text())
    name = config.get("_class_name")
    # This package's models (UViTModel, DiTModel) first; uvit_cog is imported whenever this module is.
    cls = getattr(sys.modules["uvit_cog"], str(name), None) or getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"load_model: {config_path} names _class_name={name!r}, not a diffusers model class")
    config_logger = logging.getLogger("diffusers.configuration_utils")
    quiet = _DropConfigKeyWarning()
    config_logger.addFilter(quiet)
    try:
        model = cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    finally:
        config_logger.removeFilter(quiet)
    return restore_attention(model, config, str(config_path))


def restore_attention(model: nn.Module, config: Mapping[str, Any], source: str = "config") -> nn.Module:
    """Give `model` the attention recorded in `config` by `set_attention` (nothing if none is recorded).

    For models built by `Model.from_config(config)` (e.g. an EMA copy), which ignores the record as
    `from_pretrained` does. `source` names the config in errors.
    """
    record = config.get(CONFIG_KEY)
    if record is None:
        return model
    if not isinstance(record, Mapping) or "kind" not in record or "layers" not in record:
        raise ValueError(f"{source}: field {CONFIG_KEY!r} must hold 'kind' and 'layers', got {record!r}")
    layers = record["layers"]
    if "format" not in record and layers == "first_last":  # written before "first_last" had one meaning
        layers = "all_but_first_last"
    return set_attention(model, record["kind"], layers)


__all__ = [
    "CONFIG_KEY", "RECORD_FORMAT", "attention_fn", "attention_layers", "keep_mask", "load_model", "restore_attention",
    "set_attention",
]
