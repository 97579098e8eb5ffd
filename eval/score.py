"""Evaluate images or a model against a reference: FID, KID, IS, precision/recall (torch-fidelity).

    python eval/score.py input=samples/ reference=stats/cifar10_train.npz weights=offline
    python eval/score.py input=../shared/data/cifar10.npz:x_train save_stats=stats/cifar10_train.npz
    python eval/score.py input=runs/cifar10 num_samples=10000 scheduler=dpm_solver steps=50 reference=...

A model input (pipeline or training-run directory) is sampled first (`uvit_cog.sampling.sample_and_evaluate`),
with the sampling options of sample.py (scheduler, steps, guidance, classes). Prints a table and writes the
record (metrics, counts, reference, sampler settings, seed, weights) as JSON.
"""

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from uvit_cog.metrics import compute_metrics, format_table, input_kind, resolve_device
from uvit_cog.pipeline import load_pipeline
from uvit_cog.rundir import write_text_atomic
from uvit_cog.sampling import sample_and_evaluate
from uvit_cog.schedule import SCHEDULER_NAMES


def measure_options(cfg: DictConfig) -> dict:
    """The options of the measurement itself, the same for image and model inputs."""
    return dict(metrics=list(cfg.metrics), weights=cfg.weights, seed=cfg.seed, kid_subset_size=cfg.kid_subset_size,
                save_stats=cfg.save_stats, progress=cfg.progress)


def evaluate_model(cfg: DictConfig) -> dict:
    """Sample `cfg.num_samples` images from the model directory `cfg.input`, then score them."""
    if not cfg.num_samples:
        raise ValueError(f"{cfg.input} is a model: set num_samples, the number of images to generate")
    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULER_NAMES:  # the family is checked on loading
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose one of {SCHEDULER_NAMES} or null")
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
        inception_batch_size=cfg.batch_size, samples_dir=cfg.samples_dir, **measure_options(cfg),
    )
    record["input"].update(spec=str(cfg.input), kind="model", samples_dir=cfg.samples_dir)
    return record


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if input_kind(cfg.input) == "model":
        record = evaluate_model(cfg)
    else:
        record = compute_metrics(cfg.input, cfg.reference, num_samples=cfg.num_samples, batch_size=cfg.batch_size,
                                 device=cfg.device, **measure_options(cfg))
    print(format_table(record))
    out = Path(cfg.out or Path(HydraConfig.get().runtime.output_dir) / "metrics.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
