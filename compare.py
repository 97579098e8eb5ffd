"""U-ViT against U-ViC, side by side: the same config, seeds, data order and budget, one report.

    python compare.py compare=cpu reference=runs/stats/cifar10_train.npz
    python compare.py compare=gpu reference=fid_stats_cifar10_train.npz \
        launcher="accelerate launch --multi_gpu --num_processes 4"

Each (model, seed) is one `train.py` run in `out_dir/<model>_seed<seed>` with periodic FID of the EMA
model (train.py's `fid.*`). Finished runs are kept and unfinished ones resume, so the command can be
started again after an interruption. Writes `out_dir/report.md` (table), `out_dir/report.json` and
`out_dir/report.png` (loss curves and FID against steps).
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from uvit_cog.rundir import is_pipeline_dir, run_summary


def train_run(cfg: DictConfig, model: str, experiment: str, seed: int) -> Path:
    """Train (or resume, or keep) one model with one seed; returns its run directory."""
    run_dir = Path(cfg.out_dir) / f"{model}_seed{seed}"
    if is_pipeline_dir(run_dir / "pipeline"):
        print(f"[compare] {run_dir} is finished; keeping it")
        return run_dir
    args = [f"experiment={experiment}", f"seed={seed}", f"run_dir={run_dir}", f"name={model}_seed{seed}",
            f"fid.reference={cfg.reference}", *cfg.compare.overrides]
    launcher = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable]
    command = [*launcher, "train.py", *args]
    print("[compare] " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=Path(__file__).resolve().parent).returncode != 0:
        raise SystemExit(f"compare.py: training {model} (seed {seed}) failed; see its output above. Fix the "
                         "cause and run the same command again: finished runs are kept, the rest resume.")
    return run_dir


def verdict(results: dict[str, dict[int, dict]]) -> str:
    """Which model has the lower mean final FID, and whether the gap exceeds the seed-to-seed spread."""
    mean = {m: statistics.fmean(r["final_fid"] for r in runs.values()) for m, runs in results.items()}
    spread = max(max(r["final_fid"] for r in runs.values()) - min(r["final_fid"] for r in runs.values())
                 for runs in results.values())
    best, other = sorted(mean, key=mean.get)
    gap = mean[other] - mean[best]
    seeds = len(next(iter(results.values())))
    if seeds < 2:
        return f"{best} has the lower FID ({mean[best]:.2f} vs {mean[other]:.2f}); one seed, so no spread is known."
    larger = "larger" if gap > spread else "not larger"
    return (f"{best} has the lower mean final FID ({mean[best]:.2f} vs {mean[other]:.2f}, gap {gap:.2f}); "
            f"the gap is {larger} than the seed-to-seed spread ({spread:.2f}, the largest max−min over seeds "
            f"of either model).")


def write_report(cfg: DictConfig, results: dict[str, dict[int, dict]]) -> Path:
    """report.md (table and verdict), report.json (all curves) and report.png (loss and FID against steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out_dir)
    lines = [
        f"# U-ViT vs U-ViC: `compare={cfg.compare.name}`", "",
        "| model | seed | final FID | final loss | train images/s | parameters | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, runs in results.items():
        for seed, r in runs.items():
            lines.append(f"| {model} | {seed} | {r['final_fid']:.2f} | {r['final_loss']:.4f} | "
                         f"{r['images_per_s']:.1f} | {r['parameters']:,} | `{r['run_dir']}` |")
    lines += ["", "FID at each evaluated step (mean over seeds):", "",
              "| step | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    steps = sorted({s for runs in results.values() for r in runs.values() for s, _ in r["fid"]})
    for step in steps:
        cells = []
        for runs in results.values():
            vals = [f for r in runs.values() for s, f in r["fid"] if s == step]
            cells.append(f"{statistics.fmean(vals):.2f}" if vals else "–")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", f"**Verdict:** {verdict(results)}", "",
              f"Reference: `{cfg.reference}`. Experiments: "
              + ", ".join(f"{m} = `{e}`" for m, e in cfg.compare.experiments.items())
              + f". Extra overrides: `{list(cfg.compare.overrides)}`.", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(results, indent=1))

    fig, (ax_loss, ax_fid) = plt.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(results, ["tab:blue", "tab:red", "tab:green", "tab:purple"], strict=False))
    for model, runs in results.items():
        for seed, r in runs.items():
            style = dict(color=colours[model], alpha=0.9 if seed == min(runs) else 0.5, label=f"{model} seed {seed}")
            ax_loss.plot(*zip(*r["loss"], strict=True), **style)
            if r["fid"]:
                ax_fid.plot(*zip(*r["fid"], strict=True), marker="o", **style)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    ax_fid.set(xlabel="step", ylabel="FID (EMA)", title="FID")
    ax_loss.legend(fontsize=7)
    ax_fid.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)
    return out / "report.md"


@hydra.main(config_path="conf", config_name="compare", version_base=None)
def main(cfg: DictConfig) -> None:
    if len(cfg.compare.experiments) != 2:
        raise SystemExit("compare.py: compare.experiments must name exactly two experiments (e.g. uvit, uvic)")
    if not Path(cfg.reference).exists():
        raise SystemExit(f"compare.py: reference={cfg.reference!r} does not exist; give FID statistics (.npz with "
                         "mu, sigma, e.g. from `python eval/evaluate.py`), an .npz of images or an image folder")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "compare.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results: dict[str, dict[int, dict]] = {m: {} for m in cfg.compare.experiments}
    for seed in cfg.seeds:  # seeds outermost: an interrupted comparison has both models for the first seeds
        for model, experiment in cfg.compare.experiments.items():
            results[model][int(seed)] = run_summary(train_run(cfg, model, experiment, int(seed)))
    print(write_report(cfg, results).read_text())


if __name__ == "__main__":
    main()
