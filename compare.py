"""Variants side by side: attention kinds, objectives or whole recipes, trained with the same config, seeds,
data order and budget, compared against a baseline seed by seed, in one report.

    python compare.py compare=cpu reference=runs/stats/cifar10_train_5k.npz                 # softmax vs cog
    python compare.py compare=cpu kinds=[softmax,cog,sigmoid,softpick] reference=...         # N attention kinds
    python compare.py compare=cpu objectives=[ddpm,flow_matching] reference=...              # both objectives
    python compare.py compare=gpu reference=fid_stats_cifar10_train.npz launcher="accelerate launch --multi_gpu"
    python compare.py compare=t2i_cpu                        # text-to-image: captioned digits, validation loss only

Each (variant, seed) is one `train.py` run in `out_dir/<variant>_seed<seed>`; the first variant is the baseline.
A seed fixes the initial weights (an attention kind adds or changes no shared parameter), the data order and
the noise, so each seed's difference to the baseline is a paired measurement: the report gives every seed's
difference and their spread, because the seed-to-seed spread of one model can be many times the difference
between two. Each variant is compared with the first variant of its objective (validation ε-MSE is taken at
each objective's own noise levels), as a mean over the timestep grid and per timestep, which shows where in noise
level they differ. The verdict uses the held-out validation ε-MSE when the runs logged it (exact with fixed
noise) and FID otherwise, and says which decided. Finished runs are kept and unfinished ones resume. Writes
`report.md`, `report.json` and `report.png`.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from uvit_cog.attention import ATTENTION_KINDS
from uvit_cog.checks import SEED, Choice, IntList, NameList, check_fields, check_output_dir
from uvit_cog.metrics import check_reference
from uvit_cog.rundir import is_pipeline_dir, run_summary
from uvit_cog.schedule import DEFAULT_SCHEDULERS, OBJECTIVES

VERDICTS = ("auto", "val", "fid")
CHECKS = {"kinds": NameList(ATTENTION_KINDS, optional=True), "objectives": NameList(OBJECTIVES, optional=True),
          "seeds": IntList(SEED, distinct=True), "verdict": Choice(VERDICTS)}
# What each verdict metric reads from a run summary, and how it is named in the report (lower is better).
METRICS = {"val": ("final_val_eps_mse", "validation ε-MSE"), "fid": ("final_fid", "FID")}


def variants(cfg: DictConfig) -> dict[str, list[str]]:
    """Variant name → train.py overrides. `kinds=`/`objectives=` (either or both: their product) replace the
    preset's `compare.variants`, each objective sampled with the preset's `compare.schedulers` entry (default:
    `uvit_cog.schedule.DEFAULT_SCHEDULERS`); a variant given as a string names an experiment, a list adds
    overrides to the preset's base `compare.experiment`."""
    axes = []
    if cfg.kinds:
        axes.append([(k, [f"model.attention_type={k}"]) for k in cfg.kinds])
    if cfg.objectives:
        samplers = {**DEFAULT_SCHEDULERS, **cfg.compare.get("schedulers", {})}  # a sampler of each objective's family
        # x0 clipping is a DDPM sampler option: a flow variant of a recipe that clips turns it off.
        axes.append([(o, [f"diffusion.objective={o}", f"sample.scheduler={samplers[o]}", f"fid.scheduler={samplers[o]}",
                          *(["diffusion.clip_sample=false"] if o == "flow_matching" else [])])
                     for o in cfg.objectives])
    if axes:
        return {"+".join(name for name, _ in combo): [o for _, overrides in combo for o in overrides]
                for combo in itertools.product(*axes)}
    out = {}
    for name, spec in cfg.compare.variants.items():
        out[name] = [f"experiment={spec}"] if isinstance(spec, str) else list(spec)
    return out


def train_run(cfg: DictConfig, name: str, overrides: list[str], seed: int) -> Path:
    """Train (or resume, or keep) one variant with one seed; returns its run directory."""
    run_dir = Path(cfg.out_dir) / f"{name}_seed{seed}"
    if is_pipeline_dir(run_dir / "pipeline"):
        print(f"[compare] {run_dir} is finished; keeping it")
        return run_dir
    base = [] if any(o.startswith("experiment=") for o in overrides) else [f"experiment={cfg.compare.experiment}"]
    # Without a reference no FID is measured: the verdict is the validation loss (`check_config`).
    fid = [f"fid.reference={cfg.reference}"] if cfg.reference else ["fid.every=0"]
    args = [*base, *overrides, f"seed={seed}", f"run_dir={run_dir}", f"name={name}_seed{seed}", *fid,
            *cfg.compare.overrides]
    launcher = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable]
    command = [*launcher, "train.py", *args]
    print("[compare] " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=Path(__file__).resolve().parent).returncode != 0:
        raise SystemExit(f"compare.py: training {name} (seed {seed}) failed; see its output above. Fix the "
                         "cause and run the same command again: finished runs are kept, the rest resume.")
    return run_dir


def objective_of(overrides: list[str]) -> str | None:
    """The `diffusion.objective` a variant's overrides set (None: the recipe's own)."""
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("diffusion.objective=")), None)


def baselines(specs: dict[str, list[str]]) -> dict[str, str]:
    """The variant each variant is compared with: the first variant of the same objective. Mean validation ε-MSE
    is taken at each objective's own t grid, i.e. at other noise levels, so it compares only within an objective;
    the first variant of another objective is compared with the overall baseline, flagged (`cross_objective`)."""
    first = {}
    for name, overrides in specs.items():
        first.setdefault(objective_of(overrides), name)
    overall = next(iter(specs))
    return {name: overall if first[objective_of(o)] == name else first[objective_of(o)]
            for name, o in specs.items() if name != overall}


def paired(results: dict[str, dict[int, dict]], key: str, against: dict[str, str]) -> dict[str, dict]:
    """Per variant: each seed's difference in `key` to its baseline (`against`), their mean, spread, a paired t."""
    out = {}
    for name, base in against.items():
        runs = results[name]
        diffs = {s: runs[s][key] - results[base][s][key] for s in runs
                 if math.isfinite(runs[s][key]) and math.isfinite(results[base][s][key])}
        values = list(diffs.values())
        mean = statistics.fmean(values) if values else float("nan")
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        t = mean / (std / math.sqrt(len(values))) if len(values) > 1 and std > 0 else float("nan")
        out[name] = dict(baseline=base, diffs=diffs, mean=mean, std=std, t=t, lower=sum(d < 0 for d in values),
                         n=len(values))
    return out


def same_noise_levels(a: list[float], b: list[float]) -> bool:
    """Whether two validation grids lie at the same log SNRs (a flow model's t·1000 is another noise level than
    a DDPM model's timestep of the same number)."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


def paired_per_timestep(results: dict[str, dict[int, dict]], against: dict[str, str]) -> dict[str, dict]:
    """Per variant of the same objective as its baseline: each seed's final validation ε-MSE difference at every
    grid timestep, their mean and in how many seeds the variant is lower there: where in noise level two kinds
    differ, which a mean over the grid hides. (Another objective's grid lies at other noise levels: left out.)"""
    out = {}
    for name, base in against.items():
        runs, base_runs = results[name], results[base]
        grid = next(iter(base_runs.values()))["val_timesteps"]
        seeds = [s for s in runs if runs[s]["final_val_eps_mse_t"] and base_runs[s]["final_val_eps_mse_t"]
                 and runs[s]["val_timesteps"] == base_runs[s]["val_timesteps"] == grid
                 and same_noise_levels(runs[s]["val_log_snr"], base_runs[s]["val_log_snr"])]
        if not seeds:
            continue
        diffs = {s: [a - b for a, b in zip(runs[s]["final_val_eps_mse_t"], base_runs[s]["final_val_eps_mse_t"],
                                           strict=True)] for s in seeds}
        columns = list(zip(*diffs.values(), strict=True))
        out[name] = dict(baseline=base, timesteps=grid, log_snr=base_runs[seeds[0]]["val_log_snr"], diffs=diffs,
                         mean=[statistics.fmean(c) for c in columns], lower=[sum(d < 0 for d in c) for c in columns],
                         n=len(seeds))
    return out


def decide(cfg: DictConfig, results: dict[str, dict[int, dict]]) -> tuple[str, str]:
    """The verdict metric and why: validation ε-MSE when every run logged it (unless verdict=fid), else FID."""
    have_val = all(math.isfinite(r["final_val_eps_mse"]) for runs in results.values() for r in runs.values())
    if cfg.verdict == "val" or (cfg.verdict == "auto" and have_val):
        if not have_val:
            raise SystemExit("compare.py: verdict=val but some runs logged no validation loss (set val.every > 0)")
        return "val", ("the held-out validation ε-MSE decided: fixed images, noise and timesteps make it exact, "
                       "where FID from a few thousand samples of briefly trained models mostly measures sampling "
                       "noise")
    return "fid", "FID decided (the runs logged no validation loss)" if not have_val else "FID decided (verdict=fid)"


def verdict_lines(name: str, stats: dict, label: str, cross_objective: bool) -> str:
    n, lower, baseline = stats["n"], stats["lower"], stats["baseline"]
    if n == 0:
        return f"- **{name}** vs {baseline}: no {label} to compare."
    summary = (f"{label} difference {stats['mean']:+.5g}" + (f" ± {stats['std']:.2g} (paired t = {stats['t']:.2f})"
                                                                   if n > 1 else "")
               + f"; lower than {baseline} in {lower} of {n} seed(s)")
    if cross_objective and label == METRICS["val"][1]:
        word = ("another objective: its mean ε-MSE is taken at other noise levels, so this is no verdict; compare "
                "the per-timestep curves against log SNR in report.png")
    elif n < 2:
        word = "one seed: no spread is known"
    elif lower == n:
        word = f"{name} is better in every seed"
    elif lower == 0:
        word = f"{name} is worse in every seed"
    else:
        word = "no consistent difference: the seeds disagree"
    return f"- **{name}** vs {baseline}: {summary}. {word}."


def write_report(cfg: DictConfig, specs: dict[str, list[str]], results: dict[str, dict[int, dict]]) -> Path:
    """report.md (tables, paired differences, verdict), report.json and report.png (curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, baseline = Path(cfg.out_dir), next(iter(results))
    metric, why = decide(cfg, results)
    key, label = METRICS[metric]
    lines = [f"# Comparison `compare={cfg.compare.name}`: {', '.join(results)} (baseline {baseline})", "",
             "| variant | train.py overrides |", "|---|---|"]
    lines += [f"| {name} | `{' '.join(o)}` |" for name, o in specs.items()]
    lines += ["", "| variant | seed | val ε-MSE | val loss (own objective) | final FID | final train loss | "
              "train images/s | parameters | run |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for seed, r in runs.items():
            lines.append(f"| {name} | {seed} | {r['final_val_eps_mse']:.5f} | {r['final_val_loss']:.5f} | "
                         f"{r['final_fid']:.2f} | {r['final_loss']:.4f} | {r['images_per_s']:.1f} | "
                         f"{r['parameters']:,} | `{r['run_dir']}` |")
    against = baselines(specs)
    cross = {n: objective_of(specs[n]) != objective_of(specs[b]) for n, b in against.items()}
    lines += ["", "Paired by seed, each variant against the first variant of its objective (variant − baseline; "
              "lower is better):", "",
              "| variant | baseline | metric | per-seed differences | mean | std | lower in |",
              "|---|---|---|---|---|---|---|"]
    comparisons = {m: paired(results, METRICS[m][0], against) for m in METRICS}
    for name in against:
        for m, (_, mlabel) in METRICS.items():
            s = comparisons[m][name]
            per_seed = ", ".join(f"{seed}: {d:+.4g}" for seed, d in s["diffs"].items()) or "–"
            lines.append(f"| {name} | {s['baseline']} | {mlabel} | {per_seed} | {s['mean']:+.4g} | {s['std']:.2g} | "
                         f"{s['lower']}/{s['n']} |")
    per_t = paired_per_timestep(results, against)
    grids = {name: (tuple(st["timesteps"]), tuple(round(x, 2) for x in st["log_snr"])) for name, st in per_t.items()}
    for grid, log_snr in dict.fromkeys(grids.values()):  # one table per objective's grid (its noise levels)
        lines += ["", "Final validation ε-MSE difference to the baseline at each timestep of the grid (λ: log SNR; "
                  "mean over seeds; in brackets: in how many seeds the variant is lower):", "",
                  "| variant | baseline | " + " | ".join(f"t={t:g} (λ={x:+.1f})" for t, x in zip(grid, log_snr,
                                                                                      strict=True)) + " |",
                  "|---|---|" + "---|" * len(grid)]
        for name, st in per_t.items():
            if grids[name] == (grid, log_snr):
                cells = [f"{m:+.4f} ({k}/{st['n']})" for m, k in zip(st["mean"], st["lower"], strict=True)]
                lines.append(f"| {name} | {st['baseline']} | " + " | ".join(cells) + " |")
    lines += ["", f"**Verdict** ({why}):", ""]
    lines += [verdict_lines(name, comparisons[metric][name], label, cross[name]) for name in against]
    lines += ["", f"Reference: `{cfg.reference}`. Seeds: {list(cfg.seeds)}. Extra overrides: "
              f"`{list(cfg.compare.overrides)}`.", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"baseline": baseline, "verdict_metric": metric, "variants": specs,
                                                 "paired": comparisons, "paired_per_timestep": per_t, "runs": results},
                                                indent=1))

    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    colours = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False))
    for name, runs in results.items():
        for seed, r in runs.items():
            style = dict(color=colours[name], alpha=0.9 if seed == min(runs) else 0.45,
                         label=f"{name} seed {seed}")
            for ax, curve in zip(axes[[0, 1, 3]], ("loss", "val_eps_mse", "fid"), strict=True):
                if r[curve]:
                    ax.plot(*zip(*r[curve], strict=True), marker="o" if curve != "loss" else None, **style)
            if r["final_val_eps_mse_t"]:
                axes[2].plot(r["val_log_snr"], r["final_val_eps_mse_t"], marker=".", **style)
    for name, st in per_t.items():
        axes[4].plot(st["log_snr"], st["mean"], marker="o", color=colours[name], label=f"{name} − {st['baseline']}")
        for diffs in st["diffs"].values():
            axes[4].plot(st["log_snr"], diffs, color=colours[name], alpha=0.3, linewidth=0.8)
    axes[4].axhline(0.0, color="black", linewidth=0.6)
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="validation ε-MSE", title="validation ε-MSE (held out)")
    axes[2].set(xlabel="log SNR", ylabel="ε-MSE", title="final validation ε-MSE per timestep", yscale="log")
    axes[3].set(xlabel="step", ylabel="FID (EMA)", title="FID")
    axes[4].set(xlabel="log SNR", ylabel="ε-MSE difference", title="paired difference per timestep (thin: seeds)")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)
    return out / "report.md"


def check_config(cfg: DictConfig) -> dict[str, list[str]]:
    """Every option before the first training starts (a typo in the last variant must not cost the first's
    training); returns the variants."""
    check_fields(OmegaConf.to_container(cfg, resolve=True), CHECKS)
    specs = variants(cfg)
    if len(specs) < 2:
        raise ValueError(f"{len(specs)} variant(s) ({list(specs)}); give at least two, e.g. kinds=[softmax,cog]")
    if cfg.reference:
        check_reference(cfg.reference)
    elif cfg.verdict == "fid":
        raise ValueError("verdict=fid needs reference=<FID statistics (.npz with mu, sigma, e.g. from `python "
                         "eval/score.py`), an .npz of images or an image folder>; or verdict=val")
    check_output_dir("out_dir", cfg.out_dir)
    return specs


@hydra.main(config_path="conf", config_name="compare", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        specs = check_config(cfg)
    except (ValueError, FileNotFoundError) as e:  # said in full: no traceback needed
        raise SystemExit(f"compare.py: {e}") from None
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "compare.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    results: dict[str, dict[int, dict]] = {name: {} for name in specs}
    for seed in cfg.seeds:  # seeds outermost: an interrupted comparison has every variant for the first seeds
        for name, overrides in specs.items():
            results[name][int(seed)] = run_summary(train_run(cfg, name, overrides, int(seed)))
    print(write_report(cfg, specs, results).read_text())


if __name__ == "__main__":
    main()
