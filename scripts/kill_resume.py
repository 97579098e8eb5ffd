"""Fault injection: kill -9 a tiny training run again and again, restart it each time, and check that the finished
run equals an uninterrupted one bit for bit and that no kill lost more than one checkpoint interval.

    python scripts/kill_resume.py --out runs/kill_resume     # 15 random kills + 6 inside checkpoint writes

Random kills land anywhere (start-up, training, sampling, saving); pause kills stop the process deterministically
inside a checkpoint write (`uvit_cog.checkpoints.PAUSE_POINTS`) and kill it there. Prints one JSON summary and
exits 1 if the final weights differ or a kill lost more than one interval.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from uvit_cog.checkpoints import OLD_PREFIX, PAUSE_AT, PAUSE_MARKER, list_checkpoints, verify_checkpoint
from uvit_cog.rundir import TMP_PREFIX, checkpoint_step, read_metrics

ROOT = Path(__file__).resolve().parents[1]
# Pause points a resume cycle reaches by itself ("moved_aside" needs a step saved twice: tests cover it).
CYCLE_POINTS = ("state_saved", "exported", "manifest_written", "committed")


def overrides(run_dir: Path, steps: int, every: int) -> list[str]:
    return ["data=digits", "data.resolution=8", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
            "model.patch_size=2", f"train.steps={steps}", "train.batch_size=8", "optim.warmup_steps=2",
            "log.every=1", "log.sample_every=0", f"log.checkpoint_every={every}", "log.keep_checkpoints=2",
            "sample.grid_size=2", "sample.steps=2", "data.num_workers=0", f"run_dir={run_dir}"]


def start(run_dir: Path, steps: int, every: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "train.py", *overrides(run_dir, steps, every)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def progress(run_dir: Path) -> int:
    """The last step the run logged (log.every=1: the last step it finished)."""
    return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)


def saved_step(run_dir: Path) -> int:
    """The step a restart can resume from: the newest intact checkpoint, counting one a kill left moved aside."""
    root = run_dir / "checkpoints"
    moved_aside = [p for p in root.glob(f"{OLD_PREFIX}step_*") if not (root / p.name[len(OLD_PREFIX):]).exists()]
    steps = [checkpoint_step(p.name[len(OLD_PREFIX):] if p in moved_aside else p.name)
             for p in list_checkpoints(run_dir) + moved_aside if not verify_checkpoint(p)]
    return max(steps, default=0)


def weights(run_dir: Path) -> dict:
    return {"model": load_file(list_checkpoints(run_dir)[-1] / "model.safetensors"),
            "ema": load_file(run_dir / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-kills", type=int, default=15)
    parser.add_argument("--pause-points", default=",".join(CYCLE_POINTS),
                        help="comma-separated pause points to kill at once each (in this order, cycled)")
    parser.add_argument("--pause-kills", type=int, default=6, help="kills inside checkpoint writes, cycling "
                        "through --pause-points (0: one per pause point)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--max-delay", type=float, default=12.0, help="random kills: seconds after start, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "kill_resume")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    reference, victim, log = args.out / "reference", args.out / "victim", args.out / "victim.log"
    if start(reference, args.steps, args.checkpoint_every, args.out / "reference.log").wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: see {args.out / 'reference.log'}")

    points = [p for p in args.pause_points.split(",") if p]
    n_pause = args.pause_kills or len(points)
    plan = [("pause", points[i % len(points)]) for i in range(n_pause)] + [("random", None)] * args.random_kills
    rng.shuffle(plan)
    kills, worst = [], 0
    for kind, point in plan:
        env = {PAUSE_AT: point, PAUSE_MARKER: str(args.out / "paused")} if kind == "pause" else {}
        (args.out / "paused").unlink(missing_ok=True)
        proc = start(victim, args.steps, args.checkpoint_every, log, env)
        delay = rng.uniform(0.5, args.max_delay)
        deadline = time.monotonic() + (300 if kind == "pause" else delay)
        while time.monotonic() < deadline and proc.poll() is None:
            if kind == "pause" and (args.out / "paused").exists():
                break
            time.sleep(0.02)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        elif proc.returncode != 0:
            raise SystemExit(f"the run failed by itself (exit {proc.returncode}): see {log}")
        root = victim / "checkpoints"
        # A save had begun and not ended: its temporary copy, or a step moved aside, is still there.
        inside = any(root.glob(f"{TMP_PREFIX}step_*")) or any(root.glob(f"{OLD_PREFIX}step_*"))
        done = progress(victim) if victim.exists() else 0
        lost = max(done - saved_step(victim), 0) if not finished else 0  # steps a restart has to train again
        worst = max(worst, lost)
        kills.append({"kind": kind, "point": point, "after_s": None if kind == "pause" else round(delay, 2),
                      "progress_at_kill": done, "resumable_step": saved_step(victim), "lost_steps": lost,
                      "inside_checkpoint_write": inside and not finished,
                      "finished_before_kill": finished})
        if kind == "pause" and not finished and not (args.out / "paused").exists():
            raise SystemExit(f"the run never reached pause point {point}: see {log}")
    if start(victim, args.steps, args.checkpoint_every, log).wait() != 0:
        raise SystemExit(f"the final restart failed: see {log}")

    ref, got = weights(reference), weights(victim)
    identical = all(ref[part].keys() == got[part].keys() and all(ref[part][k].equal(got[part][k]) for k in ref[part])
                    for part in ref)
    summary = {"kills": len([k for k in kills if not k["finished_before_kill"]]),
               "pause_kills": {p: sum(1 for k in kills if k["point"] == p) for p in points},
               "random_kills": sum(1 for k in kills if k["kind"] == "random" and not k["finished_before_kill"]),
               "random_kills_inside_checkpoint_writes": sum(1 for k in kills if k["kind"] == "random"
                                                            and k["inside_checkpoint_write"]),
               "max_lost_steps": worst, "checkpoint_every": args.checkpoint_every,
               "final_weights_identical": identical, "details": kills}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "details"}))
    if not identical or worst > args.checkpoint_every:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
