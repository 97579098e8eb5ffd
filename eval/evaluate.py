"""Evaluate images or a model against a reference: FID, KID, IS, precision/recall (torch-fidelity).

    python eval/evaluate.py input=samples/ reference=stats/cifar10_train.npz weights=offline
    python eval/evaluate.py input=../shared/data/cifar10.npz:x_train save_stats=stats/cifar10_train.npz
    python eval/evaluate.py input=runs/cifar10 num_samples=10000 sampler.num_inference_steps=50 reference=...

Prints a table and writes the record (metrics, counts, reference, sampler settings, seed, weights) as JSON.
"""

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from uvit_cog.metrics import compute_metrics, format_table


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    record = compute_metrics(
        cfg.input,
        cfg.reference,
        metrics=list(cfg.metrics),
        weights=cfg.weights,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        device=cfg.device,
        seed=cfg.seed,
        sampler=OmegaConf.to_container(cfg.sampler),
        samples_dir=cfg.samples_dir,
        kid_subset_size=cfg.kid_subset_size,
        save_stats=cfg.save_stats,
        progress=cfg.progress,
    )
    print(format_table(record))
    out = Path(cfg.out or Path(HydraConfig.get().runtime.output_dir) / "metrics.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
