"""The registry of attention kinds: each kind is declared once, with keyword arguments, and everything else is derived.

    register_attention_kind(
        name="cog", formula="w = sign(s)·softmax(|s|)", reference="Lv et al. 2024, arXiv 2411.07176",
        negative_weights=True, weights=cog_weights, row_map=row_maps.COG,
    )

A *parameter-free* kind declares its reference `weights` function (the specification), the keyword `arguments` its
functions take, its fused `row_map` (`uvit_cog.kernels.RowMap`, if any) and any `implementations` of its own (SDPA
for softmax). A kind *with parameters* builds on one of those (`base`) and adds an output `gate`, a `learned_sink`
or `differential` attention; it runs its base's functions. From the registry come `attention_variants` (a
function per parameter-free kind, `uvit_cog.attention.dispatch`), the modules (`Attention`, `make_attention`),
the fused kernels' row maps and their Triton specialisations (keyed by the row map's name), and the analysis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..kernels import RowMap
from .dispatch import AttentionFn, arguments, kind_function, reference

KERNEL_ARGUMENTS = ("bias", "eps", "sink")  # the parameters the fused kernels hand every row map
KERNEL_IMPLS = ("cpu", "triton")  # the fused kernels, for kinds with a row map
# An implementation of a kind's own: fn(q, k, v, attn_mask, scale, dropout_p, **arguments) with scale None
# meaning D^-½; it honours dropout_p or refuses it.
Implementation = Callable[..., Tensor]
GATES = ("elementwise", "headwise")


@dataclass(frozen=True, kw_only=True)
class AttentionKind:
    """What one attention kind is: its formula and paper, what its weights can do, and how it runs.

    Declared through `register_attention_kind(**fields)`, which completes a kind with parameters from its base
    (`weights`, `arguments`, `row_map`, `implementations`, `default_impl`) and a parameter-free kind's `base`
    (its own name), so every registered kind carries them.
    """

    name: str
    formula: str
    reference: str  # the paper
    negative_weights: bool = False  # can a weight be < 0
    sparse: bool = False  # can many weights be exactly or nearly 0 (softpick, sigmoid)
    sink: bool = False  # do the weights leave mass to a sink (rows sum below 1)
    # Parameter-free kinds: (q, k, attn_mask, scale, **arguments) -> (B, H, N, M) float32 weights, the reference.
    weights: Callable[..., Tensor] | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)  # keyword arguments and their defaults
    row_map: RowMap | None = None  # the fused kernels' row map ("cpu", and "triton" where it has one)
    implementations: Mapping[str, Implementation] = field(default_factory=dict)  # e.g. {"sdpa": ...}
    default_impl: str | None = None  # an implementation that is the default on every device (softmax: SDPA)
    # Kinds with parameters of their own, run on the parameter-free kind `base`:
    base: str | None = None
    gate: str | None = None  # an output gate σ(x W_g): "elementwise" (per channel) or "headwise"
    learned_sink: bool = False  # a learned sink logit per head, passed as the `sink` argument
    differential: bool = False  # differential attention (Ye et al.)
    # Set at registration: the function of the kind (of its base, for a kind with parameters).
    function: AttentionFn = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def has_parameters(self) -> bool:
        """Whether the kind's layers hold weights of their own (a gate, a sink, diff's λ)."""
        return self.gate is not None or self.learned_sink or self.differential

    @property
    def impls(self) -> tuple[str, ...]:
        """Every `impl=` the kind's function accepts."""
        fused = () if self.row_map is None else KERNEL_IMPLS if self.row_map.triton else KERNEL_IMPLS[:1]
        return ("reference", *self.implementations, *fused)


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def _refuse(name: str, problem: str) -> None:
    raise ValueError(f"register_attention_kind(name={name!r}): {problem}")


def _check_parameter_free(kind: AttentionKind) -> None:
    name = kind.name
    if kind.weights is None:
        _refuse(name, "a parameter-free kind needs weights=fn(q, k, attn_mask, scale, **arguments), its reference")
    for impl in kind.implementations:
        if impl in ("reference", *KERNEL_IMPLS):
            _refuse(name, f"implementation {impl!r} is the registry's own; name it otherwise")
    if kind.default_impl is not None and kind.default_impl not in kind.implementations:
        _refuse(name, f"default_impl={kind.default_impl!r} is none of its implementations {list(kind.implementations)}")
    if kind.row_map is not None and set(kind.arguments) - set(KERNEL_ARGUMENTS):
        _refuse(name, f"arguments {sorted(set(kind.arguments) - set(KERNEL_ARGUMENTS))} do not reach the fused "
                      f"kernels, which pass {KERNEL_ARGUMENTS} to every row map: use those names")


def _completed(kind: AttentionKind) -> AttentionKind:
    """The kind with what it runs on filled in: its own name as base, or its base's functions."""
    if kind.base is None:
        if kind.has_parameters:
            _refuse(kind.name, "a kind with weights of its own (gate, learned_sink, differential) runs on a "
                               f"parameter-free kind: give base=, one of {parameter_free_kinds()}")
        _check_parameter_free(kind)
        return dataclasses.replace(kind, base=kind.name)
    base = ATTENTION_KINDS.get(kind.base)
    if base is None or base.has_parameters:
        _refuse(kind.name, f"base {kind.base!r} is not one of the parameter-free kinds {parameter_free_kinds()}")
    if kind.weights is not None or kind.row_map is not None or kind.arguments or kind.implementations:
        _refuse(kind.name, f"a kind with a base runs {base.name!r}'s weights, row map, arguments and implementations")
    if kind.gate not in (None, *GATES):
        _refuse(kind.name, f"gate={kind.gate!r}: choose one of {GATES}")
    return dataclasses.replace(kind, weights=base.weights, arguments=base.arguments, row_map=base.row_map,
                               implementations=base.implementations, default_impl=base.default_impl)


def register_attention_kind(**fields: Any) -> AttentionKind:
    """Declare a kind (`AttentionKind`'s fields, by keyword) and add it to `ATTENTION_KINDS`; returns it as stored.

    Names are unique. Everything a kind needs is checked here, before it is added, with an error naming the field.
    """
    kind = AttentionKind(**fields)
    if kind.name in ATTENTION_KINDS:
        _refuse(kind.name, "registered already")
    kind = _completed(kind)
    function = kind_function(kind) if kind.base == kind.name else ATTENTION_KINDS[kind.base].function
    object.__setattr__(kind, "function", function)  # frozen: set here, once
    ATTENTION_KINDS[kind.name] = kind
    return kind


def get_attention_kind(name: str) -> AttentionKind:
    """The registered kind `name`, or a ValueError listing the registered names."""
    if name not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention_type {name!r}; choose one of {sorted(ATTENTION_KINDS)}")
    return ATTENTION_KINDS[name]


def parameter_free_kinds() -> list[str]:
    """The kinds that are plain functions of q, k and v (`attention_variants`), in registration order."""
    return [name for name, kind in ATTENTION_KINDS.items() if not kind.has_parameters]


def kernel_kinds() -> list[str]:
    """The parameter-free kinds with a fused row map (the kinds the kernels' tests and benchmarks cover)."""
    return [name for name in parameter_free_kinds() if ATTENTION_KINDS[name].row_map is not None]


def reference_attention(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    **given: Any,
) -> Tensor:
    """`weights @ v` of the kind `kind` (and its arguments: bias, eps, sink), differentiated by autograd.

    The plain O(N·M)-memory specification that the fused paths match.
    """
    spec = get_attention_kind(kind)
    return reference(spec, q, k, v, attn_mask, scale, dropout_p, arguments(spec, given, q, kind))


class _Variants(Mapping[str, AttentionFn]):
    """name → function of every parameter-free kind registered now, in registration order."""

    def __getitem__(self, name: str) -> AttentionFn:
        if name not in parameter_free_kinds():
            raise KeyError(name)
        return ATTENTION_KINDS[name].function

    def __iter__(self) -> Iterator[str]:
        return iter(parameter_free_kinds())

    def __len__(self) -> int:
        return len(parameter_free_kinds())

    def __repr__(self) -> str:
        return f"attention_variants({parameter_free_kinds()})"


# The parameter-free kinds as plain functions fn(q, k, v, attn_mask=None, scale=None, ...) -> Tensor.
attention_variants: Mapping[str, AttentionFn] = _Variants()
