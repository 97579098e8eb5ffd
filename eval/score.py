"""Evaluate images or a model against a reference: FID, KID, IS, precision/recall (torch-fidelity), and for
text-to-image models the CLIP score of the images against their prompts.

    python eval/score.py input=samples/ reference=stats/cifar10_train.npz weights=offline
    python eval/score.py input=../shared/data/cifar10.npz:x_train save_stats=stats/cifar10_train.npz
    python eval/score.py input=runs/cifar10 num_samples=10000 scheduler=dpm_solver steps=50 reference=...
    # the paper's MS-COCO protocol (prompts and val2014 statistics from scripts/mscoco_fid_protocol.py):
    accelerate launch eval/score.py input=converted/mscoco_uvic_small prompts_file=mscoco_fid/prompts.txt \
        num_samples=30000 steps=50 guidance=2 reference=mscoco_fid/fid_stats_mscoco256_val.npz metrics=[fid] \
        clip_model=openai/clip-vit-large-patch14

A model input (pipeline or training-run directory) is sampled first (`uvit_cog.sampling.sample_and_evaluate`),
with the sampling options of sample.py (scheduler, steps, guidance, classes, prompts). Prints a table and writes
the record (metrics, counts, reference, sampler settings, seed, weights) as JSON.
"""

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from uvit_cog.checkpoints import check_model_dir
from uvit_cog.checks import (
    SEED,
    Bool,
    Choice,
    Float,
    Int,
    check_device,
    check_fields,
    check_output_dir,
    check_output_file,
)
from uvit_cog.clip_score import clip_score
from uvit_cog.images import load_images
from uvit_cog.inception import check_weights
from uvit_cog.metrics import (
    METRICS,
    check_metric_names,
    check_reference,
    compute_metrics,
    format_table,
    input_kind,
    resolve_device,
    statistics_path,
)
from uvit_cog.pipeline import load_pipeline, read_prompts
from uvit_cog.rundir import write_text_atomic
from uvit_cog.sampling import sample_and_evaluate
from uvit_cog.schedule import SCHEDULER_NAMES

# The numbers and names of conf/eval.yaml (paths, metrics and the device are checked in `check_config`).
CHECKS = {
    "num_samples": Int(1, optional=True), "batch_size": Int(1), "seed": SEED, "kid_subset_size": Int(2),
    "progress": Bool(), "scheduler": Choice(SCHEDULER_NAMES, optional=True), "steps": Int(1), "guidance": Float(),
    "sample_batch_size": Int(1),
}


def requested_prompts(cfg: DictConfig) -> list[str] | None:
    """The prompts of `prompts_file` (one a line: image i's prompt), or None."""
    return None if cfg.prompts_file is None else read_prompts(cfg.prompts_file)


def check_config(cfg: DictConfig) -> str:
    """Every option, before any image is read, generated or measured; returns the input's kind."""
    check_fields(OmegaConf.to_container(cfg, resolve=True), CHECKS)
    metrics = cfg.metrics
    if not OmegaConf.is_list(metrics) or not all(isinstance(m, str) for m in metrics):
        raise ValueError(f"metrics={metrics}: not a list of names; give a list of {METRICS}, e.g. metrics=[fid,kid]")
    check_metric_names(list(metrics))
    check_device("device", cfg.device)
    check_weights("weights", cfg.weights)
    kind = input_kind(cfg.input)
    if kind == "model":
        check_model_dir(cfg.input)
        if cfg.num_samples is None:
            raise ValueError(f"input={cfg.input} is a model: set num_samples, the number of images to generate")
        if cfg.samples_dir is not None:
            check_output_dir("samples_dir", cfg.samples_dir)
    prompts = requested_prompts(cfg)
    if cfg.clip_model is not None and prompts is None:
        raise ValueError(f"clip_model={cfg.clip_model}: the CLIP score needs the images' prompts: set prompts_file")
    if prompts is not None and cfg.num_samples is not None and len(prompts) < cfg.num_samples:
        raise ValueError(f"prompts_file={cfg.prompts_file} holds {len(prompts)} prompts for num_samples="
                         f"{cfg.num_samples}: give one prompt per image")
    if cfg.reference is not None:
        check_reference(cfg.reference)
    if cfg.save_stats:
        check_output_file("save_stats", statistics_path(cfg.save_stats), (".npz",))
    if cfg.out:
        check_output_file("out", cfg.out, (".json",))
    return kind


def measure_options(cfg: DictConfig) -> dict:
    """The options of the measurement itself, the same for image and model inputs."""
    return dict(metrics=list(cfg.metrics), weights=cfg.weights, seed=cfg.seed, kid_subset_size=cfg.kid_subset_size,
                save_stats=cfg.save_stats, progress=cfg.progress)


def evaluate_model(cfg: DictConfig) -> dict:
    """Sample `cfg.num_samples` images from the model directory `cfg.input` (checked by `check_config`), then score
    them: exactly those images (`sample_and_evaluate`), in `samples_dir` only if it holds this model's set."""
    classes = cfg.classes
    if isinstance(classes, ListConfig):
        classes = OmegaConf.to_container(classes)
    elif classes is not None:
        classes = [classes]  # classes=3: one class
    pipeline = load_pipeline(cfg.input).to(resolve_device(cfg.device))
    pipeline.set_progress_bar_config(disable=True)
    record = sample_and_evaluate(
        pipeline, cfg.num_samples, cfg.reference, scheduler=cfg.scheduler, num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance, class_labels=classes, batch_size=cfg.sample_batch_size,
        inception_batch_size=cfg.batch_size, samples_dir=cfg.samples_dir, prompts=requested_prompts(cfg),
        clip_model=cfg.clip_model, **measure_options(cfg),
    )
    record["input"].update(spec=str(cfg.input), kind="model", samples_dir=cfg.samples_dir)
    return record


def evaluate_images(cfg: DictConfig) -> dict:
    """Score images (a folder, an .npz, ...): torch-fidelity's metrics, and with `clip_model` the CLIP score of
    image i against prompt i of `prompts_file`."""
    record = compute_metrics(cfg.input, cfg.reference, num_samples=cfg.num_samples, batch_size=cfg.batch_size,
                             device=cfg.device, **measure_options(cfg))
    if cfg.clip_model is not None:
        images = load_images(cfg.input, cfg.num_samples)
        prompts = requested_prompts(cfg)[: len(images)]
        record["metrics"]["clip_score"] = clip_score(images, prompts, cfg.clip_model, batch_size=cfg.batch_size,
                                                     device=cfg.device).mean
        record["clip_model"] = str(cfg.clip_model)
    return record


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    record = evaluate_model(cfg) if check_config(cfg) == "model" else evaluate_images(cfg)
    print(format_table(record))
    out = Path(cfg.out or Path(HydraConfig.get().runtime.output_dir) / "metrics.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
