"""Fault injection for training: planted pickles, damaged checkpoints, kills inside a save, a full disk, NaN losses,
two trainings on one run directory, trackers, and run directories written before this format.

Each test is the short form of a row in docs/reliability.md; `scripts/kill_resume.py` is the long one for kills.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate.utils.imports
import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    assert_same_weights,
    final_ema,
    final_model,
    npz_overrides,
    train_config,
    train_script,
)
from safetensors.torch import load_file

from uvit_cog import checkpoints, load_pipeline, training
from uvit_cog.checkpoints import (
    MANIFEST,
    PAUSE_AT,
    PAUSE_MARKER,
    CheckpointError,
    list_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from uvit_cog.rundir import LOCK_FILE, read_metrics

OLD_RUN = ROOT / "tests" / "fixtures" / "old_format_run"
# The settings the old-format fixture was trained with (see tests/fixtures/README.md); made before held-out splits,
# it trained on all 1,797 digits (data.holdout=0).
OLD_RUN_SETTINGS = ["data=digits", "data.resolution=8", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
                    "model.patch_size=2", "train.batch_size=8", "optim.warmup_steps=2", "log.every=1",
                    "log.sample_every=0", "log.checkpoint_every=2", "sample.grid_size=2", "sample.steps=2",
                    "data.holdout=0"]
OLD_RUN_ATOL = 1e-5  # the fixture's steps came from another machine: see the test for the measured margin


@pytest.fixture(scope="module")
def reference_run(mnist_npz, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4): what every faulted run must end up equal to."""
    return train_script.train(train_config(*npz_overrides(mnist_npz, tmp_path_factory.mktemp("runs") / "ref")))


@pytest.fixture
def finished_run(reference_run, tmp_path) -> Path:
    """A private copy of the reference run to damage."""
    return Path(shutil.copytree(reference_run, tmp_path / "run"))


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when unpickled with weights_only=False: stands for any code."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    return pickle.dumps(Evil())


def test_a_planted_pickle_is_never_executed_and_never_ignored(finished_run, mnist_npz, tmp_path):
    marker = tmp_path / "pwned"
    step4 = finished_run / "checkpoints" / "step_0000004"
    (step4 / "custom_checkpoint_0.pkl").write_bytes(evil_pickle(marker))
    assert any("custom_checkpoint_0.pkl: not in the manifest" in p for p in verify_checkpoint(step4))
    # An explicit resume from the tampered checkpoint is refused, naming the file.
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0.pkl: not in the manifest"):
        train_script.train(train_config(*npz_overrides(mnist_npz, finished_run, "train.steps=6", f"resume={step4}")))
    assert not marker.exists()
    # resume=auto skips it (naming it) and resumes from the intact step 2, which re-saves step 4 clean.
    train_script.train(train_config(*npz_overrides(mnist_npz, finished_run, "train.steps=6")))
    assert not marker.exists() and verify_checkpoint(step4) == []


def test_a_pickle_with_a_forged_manifest_still_cannot_run_code(finished_run, mnist_npz, tmp_path):
    """Whoever can write the run directory can also rewrite the manifest; loading stays weights-only anyway."""
    marker = tmp_path / "pwned"
    step4 = finished_run / "checkpoints" / "step_0000004"
    (step4 / "optimizer.bin").write_bytes(evil_pickle(marker))
    write_manifest(step4)
    assert verify_checkpoint(step4) == []
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        train_script.train(train_config(*npz_overrides(mnist_npz, finished_run, "train.steps=6")))
    assert not marker.exists()


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(reference_run, finished_run, mnist_npz, capsys):
    weights = finished_run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    train_script.train(train_config(*npz_overrides(mnist_npz, finished_run)))  # the same command again
    out = capsys.readouterr().out
    assert f"checkpoint {weights.parent} is damaged, skipped: {weights}: 100 bytes" in out
    assert "resuming from" in out and "step_0000002" in out
    assert verify_checkpoint(weights.parent) == []  # step 4 was trained again and saved intact
    assert_same_weights(final_model(finished_run), final_model(reference_run))
    assert_same_weights(final_ema(finished_run), final_ema(reference_run))


def test_no_intact_checkpoint_stops_naming_the_damaged_files(finished_run, mnist_npz):
    for step in ("step_0000002", "step_0000004"):
        (finished_run / "checkpoints" / step / "scheduler.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint(.|\n)*step_0000004/scheduler.bin(.|\n)*"
                                              r"step_0000002/scheduler.bin"):
        train_script.train(train_config(*npz_overrides(mnist_npz, finished_run, "train.steps=6")))


def test_only_the_main_process_verifies_checkpoints(finished_run, monkeypatch):
    """Verification hashes every file: the main process chooses, the other ranks take its choice (the choice
    reaching them over gloo is tested by test_train.py's two-process resume)."""
    def never(path):
        raise AssertionError(f"a non-main rank verified {path}")

    class Rank:
        def __init__(self, main):
            self.is_main_process, self.print = main, print

    assert checkpoints.select_checkpoint_for_all(Rank(True), finished_run, "auto").name == "step_0000004"
    monkeypatch.setattr(checkpoints, "verify_checkpoint", never)
    assert checkpoints.select_checkpoint_for_all(Rank(False), finished_run, "auto") is None  # one process: nothing sent


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(reference_run, mnist_npz, tmp_path, monkeypatch):
    run_dir = tmp_path / "full"
    manifest = checkpoints.write_manifest

    def disk_full_at_step_4(root):
        if Path(root).name.endswith("step_0000004"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))
        return manifest(root)

    monkeypatch.setattr(checkpoints, "write_manifest", disk_full_at_step_4)
    with pytest.raises(CheckpointError, match=r"step 4 \(OSError: \[Errno 28\] No space left on device(.|\n)*"
                                              r"MiB free(.|\n)*earlier checkpoints are untouched \(step_0000002\)"):
        train_script.train(train_config(*npz_overrides(mnist_npz, run_dir)))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step_0000002") == []
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    monkeypatch.setattr(checkpoints, "write_manifest", manifest)
    train_script.train(train_config(*npz_overrides(mnist_npz, run_dir)))  # space freed: the same command resumes
    assert_same_weights(final_model(run_dir), final_model(reference_run))


def nan_at(step: int, monkeypatch, scale: float = float("nan")):
    """Make the loss of training step `step` (1-based) non-finite (times `scale`)."""
    loss = training.diffusion_loss
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        value = loss(*args, **kwargs)
        return value * scale if calls["n"] == step else value

    monkeypatch.setattr(training, "diffusion_loss", faulty)


def test_a_nan_loss_is_skipped_and_counted(mnist_npz, tmp_path, monkeypatch):
    nan_at(3, monkeypatch)
    run_dir = train_script.train(train_config(*npz_overrides(mnist_npz, tmp_path / "nan", "train.steps=6")))
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] is None and all(r["loss"] is not None for r in records if r["step"] != 3)
    for weights in (final_model(run_dir), final_ema(run_dir)):
        assert all(torch.isfinite(t).all() for t in weights.values())
    for ckpt in list_checkpoints(run_dir):
        assert verify_checkpoint(ckpt) == []
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    state = json.loads((list_checkpoints(run_dir)[-1] / "train_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_a_nan_loss_stops_the_run_when_asked(mnist_npz, tmp_path, monkeypatch):
    nan_at(3, monkeypatch)
    run_dir = tmp_path / "stop"
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite loss"):
        train_script.train(train_config(*npz_overrides(mnist_npz, run_dir, "train.nonfinite=stop")))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002"]


def test_loss_scaling_recovers_from_an_overflow(mnist_npz, tmp_path, monkeypatch):
    """fp16's dynamic loss scaling, with a CPU GradScaler (accelerate gives CPUs none): a step whose scaled
    gradients overflow is skipped by the scaler, counted, the scale halves and training goes on."""
    accelerator_class = train_script.Accelerator

    def with_scaler(*args, **kwargs):
        accelerator = accelerator_class(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        return accelerator

    monkeypatch.setattr(train_script, "Accelerator", with_scaler)
    nan_at(3, monkeypatch, scale=1e36)  # finite loss, gradients that overflow once scaled
    run_dir = train_script.train(train_config(*npz_overrides(mnist_npz, tmp_path / "fp16", "train.steps=6")))
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert all(torch.isfinite(t).all() for t in final_ema(run_dir).values())


def test_kills_inside_and_outside_checkpoint_writes_resume_bit_for_bit(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/kill_resume.py", "--random-kills", "1", "--pause-points", "exported,committed",
         "--pause-kills", "0", "--steps", "9", "--checkpoint-every", "3", "--max-delay", "6",
         "--out", str(tmp_path / "kr")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["final_weights_identical"] and summary["max_lost_steps"] <= 3
    assert summary["pause_kills"] == {"exported": 1, "committed": 1}


def start_train(run_dir: Path, *overrides: str, pause_at: str, marker: Path) -> subprocess.Popen:
    env = {**os.environ, PAUSE_AT: pause_at, PAUSE_MARKER: str(marker), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *overrides, f"run_dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, "the training process ended before the pause point"
        assert time.monotonic() < deadline, "the pause point was never reached"
        time.sleep(0.05)


def test_a_kill_while_a_step_is_moved_aside_loses_nothing(finished_run, mnist_npz, tmp_path):
    """Saving a step that exists moves the old copy aside first; a kill before the new one is renamed in must not
    lose that step's only copy."""
    step4 = finished_run / "checkpoints" / "step_0000004"
    before = load_file(step4 / "model.safetensors")
    marker = tmp_path / "paused"
    proc = start_train(finished_run, *npz_overrides(mnist_npz, finished_run)[:-1],
                       f"resume={finished_run / 'checkpoints' / 'step_0000002'}", pause_at="moved_aside",
                       marker=marker)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not step4.exists() and (step4.parent / ".old_step_0000004").is_dir()  # the window itself
    train_script.train(train_config(*npz_overrides(mnist_npz, finished_run)))
    assert verify_checkpoint(step4) == []
    assert_same_weights(load_file(step4 / "model.safetensors"), before)


def test_a_second_training_on_one_run_dir_is_refused_then_takes_over_a_stale_lock(mnist_npz, tmp_path, capsys):
    run_dir, marker = tmp_path / "locked", tmp_path / "paused"
    first = start_train(run_dir, *npz_overrides(mnist_npz, run_dir)[:-1], pause_at="state_saved", marker=marker)
    try:
        wait_for(marker, first)
        with pytest.raises(RuntimeError, match=rf"run_dir={run_dir} is in use by pid {first.pid} on "):
            train_script.train(train_config(*npz_overrides(mnist_npz, run_dir)))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert f"pid {first.pid}" in (run_dir / LOCK_FILE).read_text()  # the dead process's lock file stays behind
    train_script.train(train_config(*npz_overrides(mnist_npz, run_dir)))
    assert f"took over the stale lock of pid {first.pid}" in capsys.readouterr().out


def test_tensorboard_through_accelerate(mnist_npz, tmp_path):
    run_dir = train_script.train(train_config(*npz_overrides(mnist_npz, tmp_path / "tb", "log.trackers=[tensorboard]")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "trackers").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_tracker_without_its_package_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerate.utils.imports, "is_wandb_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r"'wandb' but its package is not installed: pip install wandb"):
        train_script.train(train_config(*TINY, "log.trackers=[wandb]", f"run_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'"):
        train_script.train(train_config(*TINY, "log.trackers=[tensorbored]", f"run_dir={tmp_path / 'run'}"))


def test_a_run_directory_of_the_previous_format_loads_and_resumes(tmp_path):
    """tests/fixtures/old_format_run was written by the code before manifests (EMA pickled by accelerate, sizes in
    the model config): it samples, and resumes with the EMA taken from its safetensors export, never the pickle."""
    run_dir = Path(shutil.copytree(OLD_RUN, tmp_path / "old"))
    images = load_pipeline(run_dir)(batch_size=1, class_labels=3, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    step4 = run_dir / "checkpoints" / "step_0000004"
    assert not (step4 / MANIFEST).exists() and verify_checkpoint(step4) == []
    pickled_ema = torch.load(step4 / "custom_checkpoint_0.pkl", weights_only=True)  # the test reads it, safely
    exported_ema = load_file(step4 / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert_same_weights(pickled_ema, exported_ema)  # two stored copies of the same numbers

    train_script.train(train_config(*OLD_RUN_SETTINGS, "train.steps=6", f"run_dir={run_dir}"))
    # Bit for bit only against what this process computed: the same resume in two legs (4 -> 5 -> 6) ends equal.
    twice = Path(shutil.copytree(OLD_RUN, tmp_path / "twice"))
    for steps in (5, 6):
        train_script.train(train_config(*OLD_RUN_SETTINGS, f"train.steps={steps}", "log.checkpoint_every=1",
                                        f"run_dir={twice}"))
    assert_same_weights(final_model(run_dir), final_model(twice))
    assert_same_weights(final_ema(run_dir), final_ema(twice))
    # Steps 1-4 were computed on the machine that wrote the fixture: another BLAS or thread count sums in another order
    # and changes the last bits (measured here: 1 against 2 threads moves the weights of 6 steps by at most 6.0e-8,
    # with |w| <= 2.6). A fresh 6-step run of this process agrees within ATOL = 1e-5 (160x that; an update of one
    # step at this rate moves weights by up to 1e-3), which a resume that lost or repeated a step would not.
    fresh = train_script.train(train_config(*OLD_RUN_SETTINGS, "train.steps=6", f"run_dir={tmp_path / 'fresh'}"))
    assert_same_weights(final_model(run_dir), final_model(fresh), atol=OLD_RUN_ATOL)
    assert_same_weights(final_ema(run_dir), final_ema(fresh), atol=OLD_RUN_ATOL)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(finished_run, mnist_npz):
    path = finished_run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "loss": 0.9')  # the process died while appending
    assert [r["step"] for r in read_metrics(finished_run)] == [1, 2, 3, 4]
    train_script.train(train_config(*npz_overrides(mnist_npz, finished_run, "train.steps=6")))
    assert [r["step"] for r in read_metrics(finished_run)] == [1, 2, 3, 4, 5, 6]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        read_metrics(finished_run)
