"""train.py end to end on CPU: every data kind, the run directory, resume, interrupted saves, two processes, config
errors, and the experiment configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    TINY,
    assert_same_weights,
    final_ema,
    final_model,
    load_script,
    make_image_folder,
    npz_overrides,
    tiny_vae_dir,
    train_config,
    train_script,
)
from diffusers import DiffusionPipeline
from hydra.errors import HydraException
from safetensors.torch import load_file

from uvit_cog import UViTPipeline, checkpoints
from uvit_cog.checkpoints import list_checkpoints
from uvit_cog.model import PRESETS
from uvit_cog.rundir import read_metrics
from uvit_cog.training import ema_decay_at

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
config = train_config
metrics = read_metrics


@pytest.fixture(scope="module")
def reference_run(mnist_npz, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run on .npz data: the reference for resume, interruption and two processes."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    return train_script.train(config(*npz_overrides(mnist_npz, run_dir)))


def test_npz_run_writes_the_run_directory(reference_run):
    run = reference_run
    assert (run / "config.yaml").is_file()
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= records[0].keys()
    assert records[0]["lr"] == 0.0 and records[-1]["lr"] == pytest.approx(1e-3)  # linear warm-up over 2 steps
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    state = json.loads((run / "checkpoints" / "step_0000004" / "train_state.json").read_text())
    assert state == {"step": 4, "images_seen": 32, "processes": 1, "skipped_steps": 0}
    assert (run / "checkpoints" / "step_0000004" / "pipeline" / "model_index.json").is_file()
    # The final export is the EMA of the last checkpoint, and differs from the raw weights.
    ckpt_ema = load_file(run / "checkpoints" / "step_0000004" / "pipeline" / "transformer"
                       / "diffusion_pytorch_model.safetensors")
    assert_same_weights(final_ema(run), ckpt_ema)
    assert not torch.equal(final_ema(run)["pos_embed"], final_model(run)["pos_embed"])


def test_exported_pipeline_loads_and_samples(reference_run):
    pipe = UViTPipeline.from_pretrained(reference_run / "pipeline")
    assert pipe.transformer.config.in_channels == 1 and pipe.transformer.config.num_classes == 10
    assert pipe.transformer.attention_types == ["softmax", "cog", "softmax"]
    assert pipe.scheduler.config.prediction_type == "epsilon"
    images = pipe(batch_size=2, class_labels=[3, 7], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    path = reference_run / "pipeline"
    generic = DiffusionPipeline.from_pretrained(path, custom_pipeline=str(path), trust_remote_code=True)
    assert generic(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


def test_resume_reproduces_an_uninterrupted_run(reference_run, mnist_npz, tmp_path):
    run_dir = tmp_path / "resumed"
    train_script.train(config(*npz_overrides(mnist_npz, run_dir, "train.steps=2")))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002"]
    train_script.train(config(*npz_overrides(mnist_npz, run_dir)))  # resume=auto, now to 4 steps
    assert_same_weights(final_model(run_dir), final_model(reference_run), atol=1e-6)
    assert_same_weights(final_ema(run_dir), final_ema(reference_run), atol=1e-6)
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs."""


def test_killed_during_checkpoint_save_keeps_the_previous_one(reference_run, mnist_npz, tmp_path, monkeypatch):
    run_dir = tmp_path / "killed"
    commit = checkpoints.commit_checkpoint

    def die_before_second_commit(tmp: Path, final: Path) -> None:
        if final.name == "step_0000004":
            raise Killed  # the step-4 checkpoint is fully written to its temporary directory, never renamed
        commit(tmp, final)

    monkeypatch.setattr(checkpoints, "commit_checkpoint", die_before_second_commit)
    with pytest.raises(Killed):
        train_script.train(config(*npz_overrides(mnist_npz, run_dir)))
    assert (run_dir / "checkpoints" / ".tmp_step_0000004" / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002"]
    UViTPipeline.from_pretrained(run_dir / "checkpoints" / "step_0000002" / "pipeline")

    monkeypatch.setattr(checkpoints, "commit_checkpoint", commit)
    train_script.train(config(*npz_overrides(mnist_npz, run_dir)))  # the same command again
    assert not (run_dir / "checkpoints" / ".tmp_step_0000004").exists()
    assert_same_weights(final_model(run_dir), final_model(reference_run), atol=1e-6)
    assert_same_weights(final_ema(run_dir), final_ema(reference_run), atol=1e-6)


def test_two_processes_match_one(reference_run, mnist_npz, tmp_path):
    """Two CPU processes (gloo) train the same global batches as one, also across a resume: the checkpoints check
    at every save that the ranks' weights and EMA are identical, and the result matches the single-process run."""
    run_dir = tmp_path / "ddp"

    def launch(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # accelerate 1.x starts several CPU processes through its multi-GPU (torchrun) launcher; train.cpu=true then
        # makes them CPU processes with gloo (its `--cpu` flag alone starts one process without mpirun).
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), "train.py", "train.cpu=true",
                   *npz_overrides(mnist_npz, run_dir, *extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    launch("train.steps=2")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002"]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_0000002'} at step 2" in launch()  # now to 4 steps
    state = json.loads((run_dir / "checkpoints" / "step_0000004" / "train_state.json").read_text())
    assert state["processes"] == 2
    assert_same_weights(final_model(run_dir), final_model(reference_run), atol=1e-5)
    assert_same_weights(final_ema(run_dir), final_ema(reference_run), atol=1e-5)


def test_gradient_accumulation_matches_one_batch(reference_run, mnist_npz, tmp_path):
    run_dir = tmp_path / "accumulated"
    train_script.train(config(*npz_overrides(mnist_npz, run_dir, "train.grad_accum=2", "log.sample_every=0")))
    assert_same_weights(final_model(run_dir), final_model(reference_run), atol=1e-5)
    assert_same_weights(final_ema(run_dir), final_ema(reference_run), atol=1e-5)
    logged, reference = metrics(run_dir), metrics(reference_run)
    for key in ("loss", "grad_norm"):  # the loss and gradient of the whole batch, not of a micro-batch
        assert [r[key] for r in logged] == pytest.approx([r[key] for r in reference], rel=1e-5)


def test_ema_warmup_forgets_the_random_init():
    """With warm-up the EMA holds almost none of the initial weights after 1,000 steps; without, 0.999^1000."""
    init_share = {True: 1.0, False: 1.0}
    for warmup in init_share:
        for step in range(1, 1001):
            init_share[warmup] *= ema_decay_at(step, 0.999, warmup)
    assert ema_decay_at(1, 0.9999, True) == 2 / 11
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999
    assert init_share[True] < 1e-3 < 0.3 < init_share[False] < 0.4


def test_image_folder_run(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=4)
    run = train_script.train(config(
        "data=folder", f"data.root={root}", "data.resolution=8", "data.num_classes=2", "data.num_workers=0",
        *TINY, "train.steps=2", f"run_dir={tmp_path / 'run'}"))
    pipe = UViTPipeline.from_pretrained(run / "pipeline")
    assert pipe.transformer.config.in_channels == 3 and pipe.transformer.config.num_classes == 2


def test_latent_run_exports_the_vae(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=4)
    vae = tiny_vae_dir(tmp_path / "vae")
    latents = load_script("extract_latents").extract_latents(
        root, tmp_path / "latents", vae=str(vae), resolution=16, shard_size=8, num_loader_workers=0, device="cpu")
    run = train_script.train(config(
        "data=latents", f"data.root={latents}", "data.resolution=8", "data.num_classes=2", "data.num_workers=0",
        *TINY, "train.steps=2", f"run_dir={tmp_path / 'run'}"))
    pipe = UViTPipeline.from_pretrained(run / "pipeline")
    assert pipe.vae is not None and pipe.transformer.config.in_channels == 4
    images = pipe(batch_size=1, class_labels=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    run = train_script.train(config(
        *TINY, "data.max_images=16", "data.resolution=8", "train.batch_size=16", "train.steps=100",
        "optim.lr=3e-3", "optim.warmup_steps=0", "log.sample_every=0", "log.checkpoint_every=0",
        f"run_dir={tmp_path / 'run'}"))
    losses = [r["loss"] for r in metrics(run)]
    assert np.mean(losses[-15:]) < 0.6 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("overrides,error,match", [
    (["experiment=nope"], HydraException, r"experiment/nope(.|\n)*Available options"),
    (["model=nope"], HydraException, r"model/nope(.|\n)*Available options"),
])
def test_unknown_config_names_fail_with_the_options(overrides, error, match):
    with pytest.raises(error, match=match):
        config(*overrides)


@pytest.mark.parametrize("overrides,error,match", [
    (["data=npz"], ValueError, r"data.path is not set: data=npz needs data.path="),
    (["data=imagenet64"], ValueError, r"data.root is not set"),
    (["data=npz", "data.path=/no/such.npz"], FileNotFoundError, r"data.path=/no/such.npz does not exist"),
    (["train.batch_size=10", "train.grad_accum=4"], ValueError, r"train.batch_size=10 .* multiple of 4"),
    (["train.condition_dropout=0.1", "model.num_classes=0", "sample.guidance=1"], ValueError,
     r"train.condition_dropout > 0 needs a conditional model"),
    (["model.sample_size=32"], ValueError, r"model.sample_size=32 but data.resolution=16"),
    (["resume=/no/checkpoint"], FileNotFoundError, r"resume=/no/checkpoint: not a checkpoint"),
    (["data=imagenet256_latents", "data.root=/tmp", "diffusion.clip_sample=true"], ValueError,
     r"diffusion.clip_sample=false for latent models"),
])
def test_config_errors_stop_before_training(overrides, error, match, tmp_path):
    with pytest.raises(error, match=match):
        train_script.train(config(*overrides, f"run_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


def test_batch_must_divide_over_processes():
    with pytest.raises(ValueError, match=r"processes × train.grad_accum = 3 × 1 = 3"):
        train_script.validate_config(config("train.batch_size=64"), num_processes=3)


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"run_dir=.*file/run cannot be written"):
        train_script.train(config(f"run_dir={tmp_path / 'file' / 'run'}"))


def test_default_is_the_quickstart():
    cfg = config()
    assert cfg.name == "quickstart" and cfg.data.kind == "digits" and cfg.model.attention_type == "cog"
    assert cfg.run_dir == "runs/quickstart"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_build(name):
    cfg = config(f"experiment={name}")
    assert cfg.name == name
    with torch.device("meta"):
        model = train_script.build_model(cfg)
    if cfg.model.preset in PRESETS:  # U-ViT sizes; DiT's: tests/test_dit.py
        preset = PRESETS[cfg.model.preset]
        assert (model.config.embed_dim, model.config.depth, model.config.num_heads) == (
            preset["embed_dim"], preset["depth"], preset["num_heads"])
    if "uvi" in name:  # U-ViT / U-ViC recipes say which in their names
        assert ("uvic" in name) == ("cog" in model.attention_types)


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if "_uvic_" in e])
def test_uvic_twins_differ_only_in_attention(name):
    uvic, uvit = config(f"experiment={name}"), config(f"experiment={name.replace('_uvic_', '_uvit_')}")
    assert uvic.model.attention_type == "cog" and uvit.model.attention_type == "softmax"
    uvic.model.attention_type = uvit.model.attention_type
    uvic.name = uvit.name
    assert uvic == uvit


def test_published_recipes():
    c = config("experiment=cifar10_uvit_s2")
    assert (c.train.batch_size, c.optim.lr, c.optim.weight_decay, list(c.optim.betas), c.optim.warmup_steps,
            c.train.steps, c.train.ema_decay, c.data.hflip, c.model.num_classes, c.model.patch_size) == (
        128, 2e-4, 0.03, [0.99, 0.999], 2500, 500_000, 0.9999, True, 0, 2)
    for name, lr, dropout, steps, patch in [("imagenet64_uvit_m4", 3e-4, 0.1, 300_000, 4),
                                            ("imagenet64_uvit_l4", 3e-4, 0.1, 300_000, 4),
                                            ("imagenet256_uvit_l2", 2e-4, 0.15, 300_000, 2),
                                            ("imagenet256_uvit_h2", 2e-4, 0.1, 500_000, 2)]:
        c = config(f"experiment={name}")
        assert (c.train.batch_size, c.optim.lr, list(c.optim.betas), c.optim.warmup_steps, c.train.condition_dropout,
                c.train.steps, c.model.patch_size, c.model.num_classes) == (
            1024, lr, [0.99, 0.99], 5000, dropout, steps, patch, 1000), name
    c = config("experiment=imagenet256_uvit_h2")
    assert (c.data.kind, c.data.scale_factor, c.model.in_channels, c.model.sample_size, c.model.final_conv,
            c.diffusion.schedule) == ("latents", 0.18215, 4, 32, False, "scaled_linear")
