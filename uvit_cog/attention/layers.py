"""Which blocks a selection names: one vocabulary for every place that puts attention kinds into a model.

`UViTModel(softmax_layers=..., attention_layers={kind: ...})`, `set_attention(model, kind, layers=...)` and
`build_dit(softmax_layers=...)` all name blocks the same way, and each name means one thing everywhere:

    "first_last"           the first and the last block
    "all_but_first_last"   every block but the first and the last (U-ViC's Cog blocks)
    "all", "none"          every block, no block
    [i, j, ...]            these block indices (negative ones count from the end)

What the named blocks then get is the field's business: `softmax_layers` keeps them softmax, `layers` and
`attention_layers` give them the kind. U-ViC is `softmax_layers="first_last"`, or equally
`set_attention(model, "cog", "all_but_first_last")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

LAYER_SELECTIONS = ("first_last", "all_but_first_last", "all", "none")
# The selection that names exactly the blocks a named one leaves out.
_COMPLEMENTS = {"first_last": "all_but_first_last", "all_but_first_last": "first_last", "all": "none", "none": "all"}


def select_layers(selection: str | Sequence[int], num_layers: int, field: str) -> set[int]:
    """The indices in [0, num_layers) that `selection` names; `field` names it in errors (e.g. "softmax_layers")."""
    ends = {0, num_layers - 1}
    if isinstance(selection, str):
        named = {"first_last": ends, "all_but_first_last": set(range(num_layers)) - ends,
                 "all": set(range(num_layers)), "none": set()}
        if selection not in named:
            raise ValueError(f"unknown {field} {selection!r}; use one of {LAYER_SELECTIONS} or a list of "
                             f"block indices in [0, {num_layers})")
        return named[selection]
    indices = set()
    for i in selection:
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise ValueError(f"{field} must be one of {LAYER_SELECTIONS} or a list of block indices (ints), "
                             f"got element {i!r}")
        indices.add(int(i))
    bad = sorted(i for i in indices if not -num_layers <= i < num_layers)
    if bad:
        raise ValueError(f"{field} {bad} out of range: this model has blocks 0..{num_layers - 1} "
                         "(negative indices count from the end)")
    return {i % num_layers for i in indices}


def complement(selection: str | Sequence[int], num_layers: int) -> str | list[int]:
    """The selection of the blocks `selection` does not name: a name's counterpart, or the other indices."""
    if isinstance(selection, str):
        select_layers(selection, num_layers, "selection")  # an unknown name is refused here too
        return _COMPLEMENTS[selection]
    return sorted(set(range(num_layers)) - select_layers(selection, num_layers, "selection"))
