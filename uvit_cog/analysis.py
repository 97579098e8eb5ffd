"""What attention heads of every kind do: weight statistics, signed maps and a representational-collapse probe.

Everything here runs a model on noisy versions of real images at chosen timesteps (noised with the
model's own training schedule) and reads the attention weights through `capture_attention`. The
statistics are defined for every kind (`weight_statistics`); which of them say something depends on
the kind (`uvit_cog.attention.ATTENTION_KINDS`: negative weights for cog and diff, sparsity for
softpick and sigmoid, the sink's mass for softmax1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .attention import ATTENTION_KINDS, capture_attention
from .conditioning import Condition
from .model import CONDITION_TOKENS, UViTModel
from .objectives import Objective


def noisy_inputs(x0: Tensor, timestep: int, objective: Objective, seed: int = 0) -> Tensor:
    """x0 noised, with seeded noise, to where the model sees `timestep` (0..T−1; a flow model sees t·T) under
    its training objective (`uvit_cog.schedule.make_objective(pipe.scheduler.config)`)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    t = objective.t_of_model_timesteps(torch.full((x0.shape[0],), int(timestep), dtype=torch.long))
    return objective.add_noise(x0, noise, t)


SPARSE_BELOW = 0.01  # a weight counts as sparse below 1% of a uniform row's weight 1/M


def token_groups(model: UViTModel) -> dict[str, slice]:
    """The token groups of a U-ViT's sequence: "time", the condition's ("label" or "text") and "image" (the
    patches), in the model's own order (`uvit_cog.model.CONDITION_TOKENS`)."""
    groups, start = [("time", 1)], 0
    if model.condition is not None:
        group = {"class": "label", "text": "text"}[model.condition]
        entry = (group, model.extras - 1)
        groups.insert(0 if CONDITION_TOKENS[model.condition].before_time else 1, entry)
    out = {}
    for name, size in groups:
        out[name] = slice(start, start + size)
        start += size
    out["image"] = slice(start, None)
    return out


def group_statistics(w: Tensor, groups: dict[str, slice]) -> dict[str, Tensor]:
    """Per head, for the image tokens' rows of (B, H, N, N) weights: the share of each row's |w| that falls on each
    token group ("image->text mass") and the share on negative weights there ("image->text negative mass"),
    averaged over batch and rows. How much negative weight image tokens put on text tokens is the paper's question
    asked of text-to-image."""
    rows = w[:, :, groups["image"]]
    total = rows.abs().sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
    out = {}
    for name, keys in groups.items():
        part = rows[..., keys]
        out[f"image->{name} mass"] = (part.abs().sum(-1) / total).mean(dim=(0, 2))
        out[f"image->{name} negative mass"] = (part.clamp(max=0).abs().sum(-1) / total).mean(dim=(0, 2))
    return out


def weight_statistics(w: Tensor, attention_type: str) -> dict[str, Tensor]:
    """Per-head statistics of (B, H, N, M) weights, each an (H,) tensor averaged over batch and query rows.

    - negative_fraction: share of weights < 0; negative_mass: share of the row's |w| mass on them
      (Σ_{w<0}|w| / Σ|w|; both 0 for kinds whose weights cannot be negative);
    - sparsity: share of weights with |w| < 1%·(1/M) (softpick's exact zeros, sigmoid's tiny weights);
    - row_sum: Σ_j w_j (1 for softmax, below 1 for softmax1 and softpick, unnormalised for sigmoid);
    - sink_mass: 1 − Σ_j w_j, what a sink kind (softmax1) gives its sink; None for other kinds.
    """
    M = w.shape[-1]
    row_abs = w.abs().sum(-1)
    negative_mass = w.clamp(max=0).abs().sum(-1) / row_abs.clamp_min(torch.finfo(w.dtype).tiny)
    row_sum = w.sum(-1).mean(dim=(0, 2))
    return dict(
        negative_fraction=(w < 0).float().mean(dim=(0, 2, 3)),
        negative_mass=negative_mass.mean(dim=(0, 2)),
        sparsity=(w.abs() < SPARSE_BELOW / M).float().mean(dim=(0, 2, 3)),
        row_sum=row_sum,
        sink_mass=1.0 - row_sum if ATTENTION_KINDS[attention_type].sink else None,
    )


@torch.no_grad()
def attention_statistics(
    model: UViTModel,
    x0: Tensor,
    timesteps: Sequence[int],
    objective: Objective,
    condition: Condition | None = None,
    seed: int = 0,
) -> list[dict]:
    """Per timestep, block and head: `weight_statistics` of the layer's weights and `group_statistics` of its
    image tokens' rows, one dict per row. `condition` holds the model's condition fields for x0's images.

    For `diff` layers the heads are the differential heads (num_heads / 2) and w = w₁ − λw₂.
    """
    model.eval()
    rows, groups = [], token_groups(model)
    for t in timesteps:
        xt = noisy_inputs(x0, t, objective, seed).to(model.device, model.dtype)
        with capture_attention(model) as cap:
            model(xt, t, **(condition or {}))
        for index, block in enumerate(model.blocks):
            name = next(n for n, m in model.named_modules() if m is block.attn)
            w = cap.maps[name][0]  # (B, H, N, N)
            stats = weight_statistics(w, cap.types[name]) | group_statistics(w, groups)
            for head in range(w.shape[1]):
                values = {key: None if v is None else float(v[head]) for key, v in stats.items()}
                rows.append(dict(timestep=int(t), block=index, layer=name, attention_type=cap.types[name],
                                 head=head, **values))
    return rows


def effective_rank(tokens: Tensor) -> Tensor:
    """Roy & Vetterli's effective rank exp(H(σ/Σσ)) of each (L, D) token matrix in a (B, L, D) batch."""
    s = torch.linalg.svdvals(tokens.float())
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return entropy.exp()


def mean_pairwise_cosine(tokens: Tensor) -> Tensor:
    """Mean cosine similarity between distinct tokens of each (L, D) matrix in a (B, L, D) batch."""
    z = torch.nn.functional.normalize(tokens.float(), dim=-1)
    sim = z @ z.transpose(1, 2)
    L = tokens.shape[1]
    return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)) / (L * (L - 1))


@torch.no_grad()
def collapse_probe(
    model: UViTModel,
    x0: Tensor,
    timesteps: Sequence[int],
    objective: Objective,
    condition: Condition | None = None,
    seed: int = 0,
) -> list[dict]:
    """After each block: mean pairwise cosine similarity of the tokens and their effective rank.

    Representational collapse shows as similarity rising towards 1 and rank falling with depth.
    """
    model.eval()
    outputs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in model.blocks]
    rows = []
    try:
        for t in timesteps:
            outputs.clear()
            xt = noisy_inputs(x0, t, objective, seed).to(model.device, model.dtype)
            model(xt, t, **(condition or {}))
            for index, tokens in enumerate(outputs):
                rows.append(
                    dict(
                        timestep=int(t),
                        block=index,
                        attention_type=model.attention_types[index],
                        cosine_similarity=float(mean_pairwise_cosine(tokens).mean()),
                        effective_rank=float(effective_rank(tokens).mean()),
                    )
                )
    finally:
        for h in hooks:
            h.remove()
    return rows


@torch.no_grad()
def render_attention_maps(
    model: UViTModel,
    x0: Tensor,
    timestep: int,
    objective: Objective,
    path: str | Path,
    query_tokens: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    condition: Condition | None = None,
    seed: int = 0,
) -> Path:
    """Save a PNG of signed attention maps of the first image: rows = (block, head), columns = query patches.

    Each map shows one query token's weights over the image patches; positive weights are red,
    negative blue (a diverging colour map centred on zero), the input image is in the first column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    cfg = model.config
    side = cfg.sample_size // cfg.patch_size
    extras = model.extras
    if query_tokens is None:
        centre = (side // 2) * side + side // 2
        query_tokens = [0, centre, side * side - 1]
    if any(not 0 <= q < side * side for q in query_tokens):
        raise ValueError(f"query_tokens are patch indices in [0, {side * side}), got {list(query_tokens)}")
    blocks = list(range(len(model.blocks))) if blocks is None else list(blocks)
    xt = noisy_inputs(x0[:1], timestep, objective, seed).to(model.device, model.dtype)
    first = {name: value[:1] for name, value in (condition or {}).items()}
    with capture_attention(model) as cap:
        model(xt, timestep, **first)
    names = {id(m): n for n, m in model.named_modules()}
    maps = {b: cap.maps[names[id(model.blocks[b].attn)]][0][0] for b in blocks}  # (heads, N, N); diff: H/2 heads
    panels = [(b, h) for b in blocks for h in range(maps[b].shape[0])]
    nrows, ncols = len(panels), len(query_tokens) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows), squeeze=False)
    image = ((x0[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu()
    for r, (b, h) in enumerate(panels):
        attn = model.blocks[b].attn
        w = maps[b][h]  # (N, N)
        axes[r][0].imshow((image.squeeze(-1) if image.shape[-1] == 1 else image).numpy(), cmap="gray")
        axes[r][0].set_ylabel(f"block {b} {attn.kind.name}\nhead {h}", fontsize=6)
        for c, q in enumerate(query_tokens, start=1):
            m = w[extras + q, extras:].reshape(side, side)
            lim = float(m.abs().max()) or 1.0
            axes[r][c].imshow(m.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
            axes[r][c].plot(q % side, q // side, "k+", markersize=5)
            if r == 0:
                axes[r][c].set_title(f"query {q}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention at t={timestep} (red > 0, blue < 0)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarise_by_block(rows: list[dict], key: str) -> list[dict]:
    """Average a per-head statistic over heads and timesteps, one row per block (None where the kind has none)."""
    by_block: dict[int, list[dict]] = {}
    for row in rows:
        by_block.setdefault(row["block"], []).append(row)
    out = []
    for b, rs in sorted(by_block.items()):
        values = [r[key] for r in rs if r[key] is not None]
        out.append(dict(block=b, attention_type=rs[0]["attention_type"],
                        **{key: sum(values) / len(values) if values else None}))
    return out



def table_rows(depths: dict[str, int], block_map: dict[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """Which block of each model (name → its number of blocks) each row of a side-by-side table shows.

    Models of equal depth are compared block by block; models of different depths need an explicit `block_map`
    (name → the block index of each row, lists of one length, e.g. {"deep": [0, 2, 4], "shallow": [0, 1, 2]}),
    since pairing block i of both would compare different places of the network, and cutting the table to the
    shallower model would hide blocks without saying so.
    """
    if block_map is None:
        if len(set(depths.values())) > 1:
            rows = min(depths.values())  # the example pairs evenly spaced blocks, first with first, last with last
            example = ",".join(f"{name}:[{','.join(str(round(r * (d - 1) / max(rows - 1, 1))) for r in range(rows))}]"
                               for name, d in depths.items())
            raise ValueError(f"models of different depths {depths}: block i of one is not block i of another. Give "
                             "block_map, the block of each model that each table row shows, e.g. "
                             f"'block_map={{{example}}}'")
        return {name: list(range(depth)) for name, depth in depths.items()}
    if set(block_map) != set(depths):
        raise ValueError(f"block_map names {sorted(block_map)} but the models are {sorted(depths)}: give one list per "
                         "model")
    lengths = {name: len(rows) for name, rows in block_map.items()}
    if len(set(lengths.values())) != 1 or not min(lengths.values()):
        raise ValueError(f"block_map lists of lengths {lengths}: give every model the same number (>= 1) of rows")
    for name, rows in block_map.items():
        bad = [b for b in rows if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < depths[name]]
        if bad:
            raise ValueError(f"block_map.{name}={list(rows)}: {bad} are no blocks of {name}, which has blocks 0.."
                             f"{depths[name] - 1}")
    return {name: list(rows) for name, rows in block_map.items()}
