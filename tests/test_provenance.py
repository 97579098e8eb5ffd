"""Provenance: a run's checkpoints record what defines its training and a resume cannot change it silently; a sample
set records the model and settings it came from and is never mixed with, or scored as, another model's images; a
start that fails leaves nothing that blocks the next one."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, load_sample_script, read_pngs, sample_config, tiny_pipeline, train_config, train_script
from omegaconf import OmegaConf

from train_setup import DEFINES_TRAINING, MAY_CHANGE_ON_RESUME, covered
from uvit_cog import sampling
from uvit_cog.checkpoints import PROVENANCE, list_checkpoints, read_provenance, verify_checkpoint, write_manifest
from uvit_cog.provenance import flatten
from uvit_cog.sample_sets import SET_RECORD
from uvit_cog.sampling import generate_samples

OLD_RUN = ROOT / "tests" / "fixtures" / "old_format_run"
DIGITS = ["data.resolution=8", *TINY, "log.sample_every=0", "val.every=0"]  # the quick start, tiny


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but its lock, by relative path: what a refused start must leave as it was."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "train.lock"}


# ----------------------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory) -> Path:
    """A 2-step DDPM quick-start run (checkpoint at step 2): the run of the issue's `runs/p`, tiny."""
    return train_script.train(train_config(*DIGITS, "train.steps=2", f"run_dir={tmp_path_factory.mktemp('p') / 'p'}"))


@pytest.fixture
def run_copy(ddpm_run, tmp_path) -> Path:
    return Path(shutil.copytree(ddpm_run, tmp_path / "p"))


def test_a_checkpoint_records_what_defines_its_training(ddpm_run):
    record = read_provenance(list_checkpoints(ddpm_run)[-1])
    definition = record["definition"]
    assert record["format"] == 1 and record["accepted_changes"] == []
    assert definition["diffusion.objective"] == "ddpm" and definition["diffusion.schedule"] == "linear"
    assert definition["diffusion.prediction_type"] == "epsilon" and definition["diffusion.loss_weighting"] == "none"
    assert definition["model.backbone"] == "uvit" and definition["model.depth"] == 2  # the model as built
    assert definition["train.mixed_precision"] == "no" and definition["data.kind"] == "digits"
    assert definition["data.holdout"] == 256 and definition["optim.lr"] == 1e-3 and definition["seed"] == 0
    assert not any(k.startswith(("log.", "sample.", "val.", "fid.")) or k == "train.steps" for k in definition)


def test_a_resume_that_changes_the_objective_is_refused_naming_every_difference(run_copy):
    """The issue's case: a DDPM run resumed with experiment=quickstart_fm would train on as flow matching."""
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match=r"(?s)resuming step_0000002 would change what defines its training:\n"
                                         r".*diffusion.objective: 'ddpm' \(the run\) → 'flow_matching' \(now\)"
                                         r".*allow_resume_changes=\[diffusion.objective,diffusion.prediction_type,"
                                         r"diffusion.schedule\]"):
        train_script.train(train_config("experiment=quickstart_fm", *DIGITS, "train.steps=4", f"run_dir={run_copy}"))
    assert snapshot(run_copy) == before  # refused before anything was written


def test_steps_logging_and_sampling_may_change_on_resume(run_copy):
    """The good twin: more steps, other logging and sampling settings resume the run as it was."""
    train_script.train(train_config(*DIGITS, "train.steps=4", f"run_dir={run_copy}", "log.every=2",
                                    "sample.steps=3", "sample.guidance=2", "train.grad_accum=2"))
    record = read_provenance(list_checkpoints(run_copy)[-1])
    assert list_checkpoints(run_copy)[-1].name == "step_0000004" and record["accepted_changes"] == []


def test_an_allowed_change_is_recorded_and_carried_forward(run_copy):
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 \(the run\) → 0.0005 \(now\)"):
        train_script.train(train_config(*DIGITS, "train.steps=4", "optim.lr=5e-4", f"run_dir={run_copy}"))
    with pytest.raises(ValueError, match=r"allow_resume_changes=\['optim.lrr'\]: 'optim.lrr' names no setting that "
                                         r"defines training"):  # a typo is caught before any work
        train_script.train(train_config(*DIGITS, "train.steps=4", "optim.lr=5e-4", f"run_dir={run_copy}",
                                        "allow_resume_changes=[optim.lrr]"))
    train_script.train(train_config(*DIGITS, "train.steps=4", "optim.lr=5e-4", f"run_dir={run_copy}",
                                    "allow_resume_changes=[optim.lr]"))
    change = {"step": 2, "changes": {"optim.lr": [0.001, 0.0005]}}
    record = read_provenance(list_checkpoints(run_copy)[-1])
    assert record["accepted_changes"] == [change] and record["definition"]["optim.lr"] == 0.0005
    # The run is now a run at the new rate: resuming it needs no flag, and the history stays.
    train_script.train(train_config(*DIGITS, "train.steps=6", "optim.lr=5e-4", f"run_dir={run_copy}"))
    assert read_provenance(list_checkpoints(run_copy)[-1])["accepted_changes"] == [change]


def test_a_run_without_a_provenance_record_is_compared_with_its_config_and_then_records_it(tmp_path, capsys):
    """Run directories written before provenance records (the previous-format fixture) are compared with their
    config.yaml, resume, and record their provenance from the next checkpoint on."""
    run_dir = Path(shutil.copytree(OLD_RUN, tmp_path / "old"))
    settings = ["data=digits", "data.resolution=8", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
                "model.patch_size=2", "train.batch_size=8", "optim.warmup_steps=2", "log.every=1", "log.sample_every=0",
                "log.checkpoint_every=2", "sample.grid_size=2", "sample.steps=2", "data.holdout=0", "val.every=0"]
    with pytest.raises(ValueError, match=r"model.depth: 2 \(the run\) → 4 \(now\)"):
        train_script.train(train_config(*settings, "model.depth=4", "train.steps=6", f"run_dir={run_dir}"))
    with pytest.raises(ValueError, match=r"diffusion.objective: 'ddpm' \(the run\) → 'flow_matching' \(now\)"):
        train_script.train(train_config(*settings, "diffusion.objective=flow_matching", "sample.scheduler=flow_euler",
                                        "fid.scheduler=flow_euler", "train.steps=6", f"run_dir={run_dir}"))
    train_script.train(train_config(*settings, "train.steps=6", f"run_dir={run_dir}"))
    assert "was written before checkpoints recorded their provenance" in capsys.readouterr().out
    assert read_provenance(list_checkpoints(run_dir)[-1])["definition"]["model.embed_dim"] == 16


def test_a_failed_start_leaves_nothing_that_blocks_the_next(tmp_path, mnist_npz):
    """A start that fails on its data (after every config check passed) writes no config.yaml or checkpoint, so
    the corrected start is not taken for a resume of another model."""
    run_dir = tmp_path / "run"
    wrong = ["data=npz", f"data.path={mnist_npz}", "data.channels=3", "data.resolution=8",
             *[o for o in TINY if not o.startswith("model.depth")], "model.depth=4", "train.steps=2", "val.every=0",
             "log.sample_every=0", f"run_dir={run_dir}"]
    with pytest.raises(ValueError, match=r"has channels 1 but the config says 3: set data.channels=1"):
        train_script.train(train_config(*wrong))
    assert not (run_dir / "config.yaml").exists() and not list_checkpoints(run_dir)
    right = [o.replace("data.channels=3", "data.channels=1").replace("model.depth=4", "model.depth=2") for o in wrong]
    train_script.train(train_config(*right))
    assert list_checkpoints(run_dir)[-1].name == "step_0000002"


def test_a_damaged_provenance_record_fails_its_checkpoint_verification(run_copy):
    checkpoint = list_checkpoints(run_copy)[-1]
    (checkpoint / PROVENANCE).write_text('{"format": 1, "definition": {"optim.lr": 1.0}}')
    assert any("provenance.json: " in p for p in verify_checkpoint(checkpoint))
    write_manifest(checkpoint)  # forged to match: the record is then what the run says about itself
    with pytest.raises(ValueError, match=r"optim.lr: 1.0 \(the run\) → 0.001 \(now\)"):
        train_script.train(train_config(*DIGITS, "train.steps=4", f"run_dir={run_copy}"))


def test_every_config_key_either_defines_training_or_may_change_on_resume():
    """A new field must be classified: in a group of DEFINES_TRAINING (then it is compared on resume) or named by
    MAY_CHANGE_ON_RESUME. A top-level field in neither fails here."""
    for experiment in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        keys = flatten(OmegaConf.to_container(train_config(f"experiment={experiment}"), resolve=True))
        stray = [k for k in keys if not covered(k, DEFINES_TRAINING) and not covered(k, MAY_CHANGE_ON_RESUME)]
        assert not stray, (experiment, stray)


# ----------------------------------------------------------------------------------------------------------
# Sample sets

SAMPLER = dict(num_inference_steps=2, guidance_scale=1.5, scheduler="ddpm", batch_size=4)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    tiny_pipeline().save_pretrained(run / "pipeline")
    return run


def retrain(model_dir: Path) -> None:
    """Stands for more training of the run: the exported weights change."""
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.pos_embed.add_(0.5)
    pipe.save_pretrained(model_dir / "pipeline")


def test_sample_py_refuses_to_add_images_of_another_model_to_a_set(model_dir):
    """The issue's case: a set of 4 from the model, more training, then num_samples=8 into the same folder."""
    sample = load_sample_script()
    first = sample_config(f"model={model_dir}", "mode=fid", "num_samples=4", "steps=2", "batch_size=4")
    sample.main(first)
    out = sample.output_path(first)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    record = json.loads((out / SET_RECORD).read_text())
    assert record["model"]["source"] == str(model_dir / "pipeline") and len(record["model"]["sha256"]) == 64
    assert record["settings"] | {"seed": 0, "num_inference_steps": 2, "guidance_scale": 1.0, "class_ids": [0, 1, 2]} \
        == record["settings"] and record["settings"]["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    retrain(model_dir)
    more = sample_config(f"model={model_dir}", "mode=fid", "num_samples=8", "steps=2", "batch_size=4")
    with pytest.raises(ValueError, match=r"(?s)is a sample set of another model \(4 image\(s\).*\n  "
                                         r"model: '[0-9a-f]{64}' \(the set\) → '[0-9a-f]{64}' \(now\)"):
        sample.main(more)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing added, nothing lost


def test_a_set_grows_with_its_own_model_and_settings_only(model_dir, tmp_path, monkeypatch):
    """The good twin (the same model and settings: only the missing images are made, the first ones kept byte for
    byte), and other settings refused naming them."""
    pipe = tiny_pipeline()
    out = tmp_path / "set"
    generate_samples(pipe, out, num_samples=4, **SAMPLER)
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    made = []
    real = sampling.generate_images
    monkeypatch.setattr(sampling, "generate_images", lambda p, g, *a: made.extend(g) or real(p, g, *a))
    generate_samples(tiny_pipeline(), out, num_samples=8, **SAMPLER)  # an equal model, built again
    assert len(made) == 4 and all(out.joinpath(n).read_bytes() == b for n, b in before.items())
    for change, message in [(dict(guidance_scale=2.0), r"guidance_scale: 1.5 \(the set\) → 2.0 \(now\)"),
                            (dict(seed=1), r"seed: 0 \(the set\) → 1 \(now\)"),
                            (dict(scheduler="ddim"), r"scheduler.class: 'DDPMScheduler' \(the set\) → 'DDIMScheduler'"),
                            (dict(class_labels=[1]), r"class_ids: \[0, 1, 2\] \(the set\) → \[1\] \(now\)")]:
        with pytest.raises(ValueError, match=r"(?s)is a sample set of other settings.*" + message):
            generate_samples(pipe, out, num_samples=8, **{**SAMPLER, **change})
    # The same weights as another attention kind make other images: another model.
    other_kind = tiny_pipeline(attention_type="softmax")
    with pytest.raises(ValueError, match=r"is a sample set of another model"):
        generate_samples(other_kind, out, num_samples=8, **SAMPLER)


def test_images_without_a_record_are_refused_and_a_set_without_images_takes_any(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for i in range(3):
        shutil.copy(ROOT / "docs" / "results" / "maps_cog.png", foreign / f"{i:06d}.png")
    with pytest.raises(ValueError, match=r"holds 3 sample image\(s\) \(000000.png, ...\) but no sample_set.json"):
        generate_samples(tiny_pipeline(), foreign, num_samples=4, **SAMPLER)
    assert sorted(p.name for p in foreign.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    # A start that stopped before its first image (its record written) does not bind the next one.
    monkeypatch.setattr(sampling, "generate_images", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        generate_samples(tiny_pipeline(), tmp_path / "empty", num_samples=4, **SAMPLER)
    monkeypatch.undo()
    assert (tmp_path / "empty" / SET_RECORD).is_file()
    generate_samples(tiny_pipeline(), tmp_path / "empty", num_samples=2, **{**SAMPLER, "guidance_scale": 3.0})


def test_a_truncated_png_of_a_set_is_made_again(tmp_path, capsys):
    pipe = tiny_pipeline()
    out = generate_samples(pipe, tmp_path / "set", num_samples=4, **SAMPLER)
    whole = read_pngs(out, 4)
    damaged = out / "000002.png"
    damaged.write_bytes(damaged.read_bytes()[:-20])  # cut short by a copy, not by our atomic writes
    generate_samples(pipe, out, num_samples=4, **SAMPLER)
    assert "1 image(s) cut short (000002.png): made again" in capsys.readouterr().out
    np.testing.assert_array_equal(read_pngs(out, 4), whole)
