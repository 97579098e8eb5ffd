"""Attention analysis of trained models of any attention kinds, side by side.

    python analyze.py models.uvit=runs/cmp_uvit models.uvic=runs/cmp_uvic images=../shared/data/cifar10.npz
    python analyze.py models.uvit=A models.uvic=B +models.softpick=C +models.softmax1=D images=...

Writes `out_dir/analysis.json` (per layer and head), `out_dir/analysis.md` (per-block tables: negative
weight fraction, negative |w| share, sparsity, row sum, sink mass, token cosine similarity, effective
rank; "–" where a kind has no such statistic) and `out_dir/maps_<name>.png` (signed attention maps:
red positive, blue negative). Models of different depths are compared only through an explicit `block_map`
(`uvit_cog.analysis.table_rows`). Every option and model is checked before any analysis runs (`check_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from uvit_cog.analysis import (
    SPARSE_BELOW,
    attention_statistics,
    collapse_probe,
    render_attention_maps,
    summarise_by_block,
    table_rows,
)
from uvit_cog.checkpoints import check_model_dir
from uvit_cog.checks import SEED, Int, IntList, check_fields, check_output_dir
from uvit_cog.data import ArrayDataset
from uvit_cog.images import as_nhwc, load_npz_arrays
from uvit_cog.model import UViTModel
from uvit_cog.pipeline import UViTPipeline, load_pipeline
from uvit_cog.schedule import make_objective

CHECKS = {"num_images": Int(1), "timesteps": IntList(Int(0)), "map_timestep": Int(0),
          "query_tokens": IntList(Int(0), optional=True), "map_blocks": IntList(Int(0), optional=True, distinct=True),
          "seed": SEED}


def markdown_table(columns: dict[str, list[dict]], key: str, rows: dict[str, list[int]], fmt: str = "{:.3f}") -> str:
    """One row per entry of `rows` (each model's block in that row), one column per model; "–" where the block's
    kind has no such statistic. The row is labelled with the blocks it shows when they differ between models."""
    names = list(columns)
    lines = ["| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def cell(row: dict) -> str:
        value = "–" if row[key] is None else fmt.format(row[key])
        return f"{value} ({row['attention_type']})"

    for r in range(len(rows[names[0]])):
        blocks = [rows[n][r] for n in names]
        label = str(blocks[0]) if len(set(blocks)) == 1 else "/".join(map(str, blocks))
        lines.append(f"| {label} | " + " | ".join(cell(columns[n][rows[n][r]]) for n in names) + " |")
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


def check_config(cfg: DictConfig) -> tuple[dict[str, UViTPipeline], np.ndarray, np.ndarray | None, dict]:
    """Every option, the images and every model before any analysis: returns the loaded pipelines, the images,
    their labels and the table rows (`table_rows`)."""
    check_fields(OmegaConf.to_container(cfg, resolve=True), CHECKS)
    models = {name: path for name, path in cfg.models.items() if path is not None}
    if not models:
        raise ValueError("models: none given; give at least one model, e.g. models.uvic=runs/my_run")
    if not Path(cfg.images).is_file():
        raise ValueError(f"images={cfg.images!r}: not a file; give an .npz of uint8 images")
    images, labels = load_npz_arrays(cfg.images, cfg.split)
    images = as_nhwc(images, str(cfg.images))  # uint8, and a layout that reads one way only
    if cfg.num_images > len(images):
        raise ValueError(f"num_images={cfg.num_images}: {cfg.images} holds {len(images)} images; set num_images <= "
                         f"{len(images)}")
    check_output_dir("out_dir", cfg.out_dir)
    pipes = {}
    for name, path in models.items():
        pipe = load_pipeline(check_model_dir(path))
        model = pipe.transformer
        if not isinstance(model, UViTModel):
            raise ValueError(f"models.{name}={path} is a {type(model).__name__}; attention weights are read from this "
                             "toolkit's own attention layers, which only UViTModel has (diffusers' attention "
                             "processors, DiT's included, compute attention without exposing its weights)")
        if images.shape[-1] != model.config.in_channels:
            raise ValueError(f"images={cfg.images}: {images.shape[-1]} channel(s), but models.{name} takes "
                             f"{model.config.in_channels}; give images the models were trained on")
        timesteps = pipe.scheduler.config.num_train_timesteps
        IntList(Int(0, timesteps - 1))("timesteps", list(cfg.timesteps))
        Int(0, timesteps - 1)("map_timestep", cfg.map_timestep)
        side = model.config.sample_size // model.config.patch_size
        IntList(Int(0, side * side - 1), optional=True)("query_tokens", OmegaConf.to_container(cfg.query_tokens)
                                                        if cfg.query_tokens is not None else None)
        IntList(Int(0, len(model.blocks) - 1), optional=True)("map_blocks", OmegaConf.to_container(cfg.map_blocks)
                                                              if cfg.map_blocks is not None else None)
        pipes[name] = pipe
    block_map = OmegaConf.to_container(cfg.block_map) if cfg.block_map is not None else None
    rows = table_rows({name: len(pipe.transformer.blocks) for name, pipe in pipes.items()}, block_map)
    return pipes, images, labels, rows


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        pipes, images, labels, rows = check_config(cfg)
    except (ValueError, FileNotFoundError) as e:  # said in full: no traceback needed
        raise SystemExit(f"analyze.py: {e}") from None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, results = ["# Attention analysis", ""], {}
    stats_by_model: dict[str, dict[str, list[dict]]] = {}
    for name, pipe in pipes.items():
        model = pipe.transformer.float()
        data = ArrayDataset(images[: cfg.num_images], None if labels is None else labels[: cfg.num_images],
                            model.config.sample_size, name=str(cfg.images))
        x0 = torch.stack([data[i]["x"] for i in range(len(data))])
        y = data.labels if model.config.num_classes > 0 and labels is not None else None
        schedule = make_objective(pipe.scheduler.config)  # DDPM or flow matching: the model's own noising
        attn = attention_statistics(model, x0, list(cfg.timesteps), schedule, y, cfg.seed)
        probe = collapse_probe(model, x0, list(cfg.timesteps), schedule, y, cfg.seed)
        render_attention_maps(model, x0, cfg.map_timestep, schedule, out / f"maps_{name}.png",
                              cfg.query_tokens, cfg.map_blocks, y, cfg.seed)
        results[name] = dict(path=str(cfg.models[name]), attention=attn, collapse=probe)
        stats_by_model[name] = {key: summarise_by_block(attn, key) for key in WEIGHT_TITLES}
        stats_by_model[name] |= {key: summarise_by_block(probe, key) for key in PROBE_TITLES}
    (out / "analysis.json").write_text(json.dumps(results, indent=1))
    for key, title in (WEIGHT_TITLES | PROBE_TITLES).items():
        report += [f"## {title}", "", f"Averaged over heads, {cfg.num_images} images and timesteps "
                   f"{list(cfg.timesteps)}.", "",
                   markdown_table({n: s[key] for n, s in stats_by_model.items()}, key, rows), ""]
    report += [f"Maps (t={cfg.map_timestep}): " + ", ".join(f"`maps_{n}.png`" for n in pipes), ""]
    (out / "analysis.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
