"""What Cog heads do: negative-weight statistics, signed attention maps and a representational-collapse probe.

Everything here runs a model on noisy versions of real images at chosen timesteps (noised with the
model's own training schedule) and reads the attention weights through `capture_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from .attention import capture_attention
from .model import UViTModel


def noisy_inputs(x0: Tensor, timestep: int, scheduler: DDPMScheduler, seed: int = 0) -> Tensor:
    """x0 noised to `timestep` with the model's training schedule, with seeded noise."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    t = torch.full((x0.shape[0],), int(timestep), dtype=torch.long)
    return scheduler.add_noise(x0, noise, t)


@torch.no_grad()
def attention_statistics(
    model: UViTModel,
    x0: Tensor,
    timesteps: Sequence[int],
    scheduler: DDPMScheduler,
    class_labels: Tensor | None = None,
    seed: int = 0,
) -> list[dict]:
    """Per timestep, block and head: the fraction of weights that are negative and the negative share of |w|.

    Each row of |w| sums to 1, so the negative share is the mean over rows of Σ_{w<0} |w|.
    """
    model.eval()
    rows = []
    for t in timesteps:
        xt = noisy_inputs(x0, t, scheduler, seed).to(model.device, model.dtype)
        with capture_attention(model) as cap:
            model(xt, t, class_labels)
        for index, block in enumerate(model.blocks):
            name = next(n for n, m in model.named_modules() if m is block.attn)
            w = cap.maps[name][0]  # (B, H, N, N)
            negative = (w < 0).float().mean(dim=(0, 2, 3))
            mass = w.clamp(max=0).abs().sum(-1).mean(dim=(0, 2))
            for head in range(w.shape[1]):
                rows.append(
                    dict(
                        timestep=int(t),
                        block=index,
                        layer=name,
                        attention_type=cap.types[name],
                        head=head,
                        negative_fraction=float(negative[head]),
                        negative_mass=float(mass[head]),
                    )
                )
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
    scheduler: DDPMScheduler,
    class_labels: Tensor | None = None,
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
            xt = noisy_inputs(x0, t, scheduler, seed).to(model.device, model.dtype)
            model(xt, t, class_labels)
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
    scheduler: DDPMScheduler,
    path: str | Path,
    query_tokens: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    class_labels: Tensor | None = None,
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
    xt = noisy_inputs(x0[:1], timestep, scheduler, seed).to(model.device, model.dtype)
    labels = None if class_labels is None else class_labels[:1]
    with capture_attention(model) as cap:
        model(xt, timestep, labels)
    names = {id(m): n for n, m in model.named_modules()}
    heads = cfg.num_heads
    nrows, ncols = len(blocks) * heads, len(query_tokens) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows), squeeze=False)
    image = ((x0[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu()
    for r, (b, h) in enumerate((b, h) for b in blocks for h in range(heads)):
        attn = model.blocks[b].attn
        w = cap.maps[names[id(attn)]][0][0, h]  # (N, N)
        axes[r][0].imshow((image.squeeze(-1) if image.shape[-1] == 1 else image).numpy(), cmap="gray")
        axes[r][0].set_ylabel(f"block {b} {attn.attention_type}\nhead {h}", fontsize=6)
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
    """Average a per-head statistic over heads and timesteps, one row per block."""
    by_block: dict[int, list[dict]] = {}
    for row in rows:
        by_block.setdefault(row["block"], []).append(row)
    return [
        dict(block=b, attention_type=rs[0]["attention_type"], **{key: sum(r[key] for r in rs) / len(rs)})
        for b, rs in sorted(by_block.items())
    ]

