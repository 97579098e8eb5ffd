"""Attention analysis of trained models of any attention kinds, side by side.

    python analyze.py models.uvit=runs/cmp_uvit models.uvic=runs/cmp_uvic images=../shared/data/cifar10.npz
    python analyze.py models.uvit=A models.uvic=B +models.softpick=C +models.softmax1=D images=...
    python analyze.py models.uvit=T2I_A models.uvic=T2I_B images=... prompts_file=prompts.txt   # text-to-image

Writes `out_dir/analysis.json` (per layer and head), `out_dir/analysis.md` (per-block tables: negative
weight fraction, negative |w| share, sparsity, row sum, sink mass, token cosine similarity, effective
rank; "–" where a kind has no such statistic; and by token group: the share of the image tokens' |w| on the time,
label or text and image tokens, and on negative weights there — how much negative weight image tokens put on text
tokens) and `out_dir/maps_<name>.png` (signed attention maps:
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
    token_groups,
)
from uvit_cog.checkpoints import check_model_dir
from uvit_cog.checks import SEED, Int, IntList, check_fields, check_output_dir
from uvit_cog.data import ArrayDataset
from uvit_cog.images import as_nhwc, load_npz_arrays
from uvit_cog.model import UViTModel
from uvit_cog.objectives import make_objective
from uvit_cog.pipeline import UViTPipeline, UViTText2ImagePipeline, load_pipeline, read_prompts

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
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file is not None else None
    if prompts is not None and len(prompts) not in (1, cfg.num_images) and len(prompts) < cfg.num_images:
        raise ValueError(f"prompts_file={cfg.prompts_file} holds {len(prompts)} prompts for num_images="
                         f"{cfg.num_images}: give one prompt for all images or one per image")
    pipes = {}
    for name, path in models.items():
        pipe = load_pipeline(check_model_dir(path))
        model = pipe.transformer
        if not isinstance(model, UViTModel):
            raise ValueError(f"models.{name}={path} is a {type(model).__name__}; attention weights are read from this "
                             "toolkit's own attention layers, which only UViTModel has (diffusers' attention "
                             "processors, DiT's included, compute attention without exposing its weights)")
        channels = 3 if pipe.vae is not None else model.config.in_channels  # latent models: RGB into their VAE
        if images.shape[-1] != channels:
            raise ValueError(f"images={cfg.images}: {images.shape[-1]} channel(s), but models.{name} takes "
                             f"{channels}; give images the models were trained on")
        if isinstance(pipe, UViTText2ImagePipeline) and prompts is None:
            raise ValueError(f"models.{name}={path} is text-to-image: give prompts_file=FILE (one prompt a line: "
                             "prompt i for image i, or one prompt for all)")
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


@torch.no_grad()
def model_inputs(pipe: UViTPipeline | UViTText2ImagePipeline, images: np.ndarray, labels: np.ndarray | None,
                 cfg: DictConfig) -> tuple[torch.Tensor, dict]:
    """A model's inputs for the analysis: the images as x0 (latent models: the mean of their VAE encoding at the
    model's scale) and the condition: their labels (class-conditional models), the features of prompt i of
    `prompts_file` for image i (text-to-image), or none."""
    model, vae = pipe.transformer, pipe.vae
    data = ArrayDataset(images, labels, model.config.sample_size * pipe.vae_scale_factor, name=str(cfg.images))
    x0 = torch.stack([data[i]["x"] for i in range(len(data))])
    if vae is not None:
        x0 = vae.float().encode(x0).latent_dist.mean * vae.config.scaling_factor
    if isinstance(pipe, UViTText2ImagePipeline):
        prompts = read_prompts(cfg.prompts_file)
        prompts = prompts * len(x0) if len(prompts) == 1 else prompts[: len(x0)]
        return x0, {"encoder_hidden_states": pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)[0].float()}
    if model.config.num_classes > 0 and labels is not None:
        return x0, {"class_labels": data.labels}
    return x0, {}


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
        x0, condition = model_inputs(pipe, images[: cfg.num_images],
                                     None if labels is None else labels[: cfg.num_images], cfg)
        schedule = make_objective(pipe.scheduler.config)  # DDPM or flow matching: the model's own noising
        attn = attention_statistics(model, x0, list(cfg.timesteps), schedule, condition, cfg.seed)
        probe = collapse_probe(model, x0, list(cfg.timesteps), schedule, condition, cfg.seed)
        render_attention_maps(model, x0, cfg.map_timestep, schedule, out / f"maps_{name}.png",
                              cfg.query_tokens, cfg.map_blocks, condition, cfg.seed)
        results[name] = dict(path=str(cfg.models[name]), attention=attn, collapse=probe)
        stats_by_model[name] = {key: summarise_by_block(attn, key) for key in WEIGHT_TITLES}
        stats_by_model[name] |= {key: summarise_by_block(probe, key) for key in PROBE_TITLES}
    (out / "analysis.json").write_text(json.dumps(results, indent=1))
    shared_groups = set.intersection(*(set(token_groups(p.transformer)) for p in pipes.values()))
    group_titles = {f"image->{g} {what}": f"Share of the image tokens' |w| {where} the {g} token(s)"
                    for g in token_groups(next(iter(pipes.values())).transformer) if g in shared_groups
                    for what, where in (("mass", "on"), ("negative mass", "on negative weights of"))}
    for name, attn in ((n, r["attention"]) for n, r in results.items()):
        stats_by_model[name] |= {key: summarise_by_block(attn, key) for key in group_titles}
    for key, title in (WEIGHT_TITLES | PROBE_TITLES | group_titles).items():
        report += [f"## {title}", "", f"Averaged over heads, {cfg.num_images} images and timesteps "
                   f"{list(cfg.timesteps)}.", "",
                   markdown_table({n: s[key] for n, s in stats_by_model.items()}, key, rows), ""]
    report += [f"Maps (t={cfg.map_timestep}): " + ", ".join(f"`maps_{n}.png`" for n in pipes), ""]
    (out / "analysis.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
