"""Attention analysis of trained models of any attention kinds, side by side.

    python analyze.py models.uvit=runs/cmp_uvit models.uvic=runs/cmp_uvic images=../shared/data/cifar10.npz
    python analyze.py models.uvit=A models.uvic=B +models.softpick=C +models.softmax1=D images=...

Writes `out_dir/analysis.json` (per layer and head), `out_dir/analysis.md` (per-block tables: negative
weight fraction, negative |w| share, sparsity, row sum, sink mass, token cosine similarity, effective
rank; "–" where a kind has no such statistic) and `out_dir/maps_<name>.png` (signed attention maps:
red positive, blue negative).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from uvit_cog.analysis import (
    SPARSE_BELOW,
    attention_statistics,
    collapse_probe,
    render_attention_maps,
    summarise_by_block,
)
from uvit_cog.data import ArrayDataset
from uvit_cog.images import load_npz_arrays
from uvit_cog.model import UViTModel
from uvit_cog.pipeline import load_pipeline
from uvit_cog.schedule import make_objective


def markdown_table(columns: dict[str, list[dict]], key: str, fmt: str = "{:.3f}") -> str:
    """One row per block, one column per model; "–" where the block's kind has no such statistic."""
    names = list(columns)
    lines = ["| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def cell(row: dict) -> str:
        value = "–" if row[key] is None else fmt.format(row[key])
        return f"{value} ({row['attention_type']})"

    for i in range(len(next(iter(columns.values())))):
        cells = [cell(columns[n][i]) for n in names]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WEIGHT_TITLES = dict(  # the keys of uvit_cog.analysis.weight_statistics
    negative_fraction="Fraction of attention weights that are negative (cog, diff)",
    negative_mass="Share of |w| mass on negative weights (cog, diff)",
    sparsity=f"Fraction of weights below {SPARSE_BELOW:g}/M (softpick: exact zeros; sigmoid)",
    row_sum="Row sum of the weights Σ_j w_j (softmax: 1; sigmoid: unnormalised)",
    sink_mass="Mass the sink takes, 1 − Σ_j w_j (softmax1 kinds)",
)
PROBE_TITLES = dict(
    cosine_similarity="Mean pairwise cosine similarity of tokens after each block (collapse: → 1)",
    effective_rank="Effective rank of the tokens after each block (collapse: → 1)",
)


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
def main(cfg: DictConfig) -> None:
    models = {name: path for name, path in cfg.models.items() if path is not None}
    if not models:
        raise SystemExit("analyze.py: give at least one model, e.g. models.uvic=runs/my_run")
    if not Path(cfg.images).is_file():
        raise SystemExit(f"analyze.py: images={cfg.images!r} is not a file; give an .npz of uint8 images")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_npz_arrays(cfg.images, cfg.split)
    report, results = ["# Attention analysis", ""], {}
    stats_by_model: dict[str, dict[str, list[dict]]] = {}
    for name, path in models.items():
        pipe = load_pipeline(path)
        model = pipe.transformer.float()
        if not isinstance(model, UViTModel):
            raise SystemExit(f"analyze.py: model {name} ({path}) is a {type(model).__name__}; attention weights are "
                             "read from this toolkit's own attention layers, which only UViTModel has (diffusers' "
                             "attention processors, DiT's included, compute attention without exposing its weights)")
        data = ArrayDataset(images[: cfg.num_images], None if labels is None else labels[: cfg.num_images],
                            model.config.sample_size)
        if data.channels != model.config.in_channels:
            raise SystemExit(f"analyze.py: {cfg.images} has {data.channels} channels, model {name} expects "
                             f"{model.config.in_channels}")
        x0 = torch.stack([data[i]["x"] for i in range(len(data))])
        y = data.labels if model.config.num_classes > 0 and labels is not None else None
        schedule = make_objective(pipe.scheduler.config)  # DDPM or flow matching: the model's own noising
        attn = attention_statistics(model, x0, list(cfg.timesteps), schedule, y, cfg.seed)
        probe = collapse_probe(model, x0, list(cfg.timesteps), schedule, y, cfg.seed)
        render_attention_maps(model, x0, cfg.map_timestep, schedule, out / f"maps_{name}.png",
                              cfg.query_tokens, cfg.map_blocks, y, cfg.seed)
        results[name] = dict(path=str(path), attention=attn, collapse=probe)
        stats_by_model[name] = {key: summarise_by_block(attn, key) for key in WEIGHT_TITLES}
        stats_by_model[name] |= {key: summarise_by_block(probe, key) for key in PROBE_TITLES}
    (out / "analysis.json").write_text(json.dumps(results, indent=1))
    for key, title in (WEIGHT_TITLES | PROBE_TITLES).items():
        report += [f"## {title}", "", f"Averaged over heads, {cfg.num_images} images and timesteps "
                   f"{list(cfg.timesteps)}.", "",
                   markdown_table({n: s[key] for n, s in stats_by_model.items()}, key), ""]
    report += [f"Maps (t={cfg.map_timestep}): " + ", ".join(f"`maps_{n}.png`" for n in models), ""]
    (out / "analysis.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
