"""The validation loss (uvit_cog.training.validation_loss) and held-out data (uvit_cog.data): determinism, the t
grid, the ε-MSE conversion, held-out splits, and the val_* records of a training run, resumed or not."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY, assert_same_weights, final_ema, tiny_model, train_config, train_script

from uvit_cog.checkpoints import PROVENANCE, list_checkpoints, write_manifest
from uvit_cog.data import build_dataset, build_validation_dataset, holdout_split
from uvit_cog.objectives import make_objective
from uvit_cog.rundir import read_metrics
from uvit_cog.schedule import scheduler_config
from uvit_cog.training import validation_images, validation_loss

pytestmark = pytest.mark.usefixtures("single_thread")
OBJECTIVES = {
    "epsilon": scheduler_config("linear", "epsilon"),
    "v_prediction": scheduler_config("cosine", "v_prediction"),
    "sample": scheduler_config("linear", "sample"),
    "flow_matching": scheduler_config(objective="flow_matching", shift=3.0),
}


def held_out(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_same_model_and_seed_give_the_same_numbers(name):
    objective = make_objective(OBJECTIVES[name])
    model, (x0, labels) = tiny_model(), held_out()
    first = validation_loss(model, objective, x0, {"class_labels": labels}, num_timesteps=5, seed=3, batch_size=12)
    again = validation_loss(model, objective, x0, {"class_labels": labels}, num_timesteps=5, seed=3, batch_size=12)
    assert first == again  # bit for bit
    rebatched = validation_loss(model, objective, x0, {"class_labels": labels}, num_timesteps=5, seed=3, batch_size=5)
    for key in ("val_loss_t", "val_eps_mse_t"):  # the noise does not depend on the batching
        np.testing.assert_allclose(rebatched[key], first[key], rtol=1e-5)
    other = validation_loss(model, objective, x0, {"class_labels": labels}, num_timesteps=5, seed=4, batch_size=12)
    assert other["val_loss"] != first["val_loss"]
    assert not model.training  # left in the mode it was in (tiny_model is in eval mode)
    model.train()
    validation_loss(model, objective, x0, {"class_labels": labels}, num_timesteps=2)
    assert model.training


def test_the_grid_of_timesteps():
    model, (x0, _) = tiny_model(num_classes=0), held_out()
    ddpm = validation_loss(model, make_objective(OBJECTIVES["epsilon"]), x0, {}, num_timesteps=10)
    assert ddpm["val_timesteps"] == [50.0, 150.0, 250.0, 350.0, 450.0, 550.0, 650.0, 750.0, 850.0, 950.0]
    flow = validation_loss(model, make_objective(OBJECTIVES["flow_matching"]), x0, {}, num_timesteps=4)
    # t = (k + 1/2)/4, not shifted (the shift changes training, not the yardstick); the model sees t·1000.
    np.testing.assert_allclose(flow["val_timesteps"], [125.0, 375.0, 625.0, 875.0], rtol=1e-6)
    np.testing.assert_allclose(flow["val_log_snr"], [2 * math.log((1 - t) / t) for t in (0.125, 0.375, 0.625, 0.875)],
                               rtol=1e-6)
    for record, k in ((ddpm, 10), (flow, 4)):
        assert all(len(record[key]) == k for key in ("val_loss_t", "val_eps_mse_t", "val_timesteps", "val_log_snr"))
        assert record["val_loss"] == pytest.approx(np.mean(record["val_loss_t"]))
        assert record["val_eps_mse"] == pytest.approx(np.mean(record["val_eps_mse_t"]))
    assert np.all(np.diff(ddpm["val_log_snr"]) < 0) and np.all(np.diff(flow["val_log_snr"]) < 0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_eps_mse_is_the_prediction_error_in_noise_units(name):
    """ε̂ − ε is a known multiple of the error of each target: flow (1 − t)·Δv; ε Δε; v α·Δv; x0 −(α/σ)·Δx0."""
    objective = make_objective(OBJECTIVES[name])
    torch.manual_seed(0)
    model, (x0, labels) = tiny_model(), held_out()
    record = validation_loss(model, objective, x0, {"class_labels": labels}, num_timesteps=6)
    grid = objective.grid(6)
    if name == "flow_matching":
        factor = (1 - grid.double()).square()
    else:
        a = objective.scheduler.alphas_cumprod.double()[grid]
        factor = {"epsilon": torch.ones_like(a), "v_prediction": a, "sample": a / (1 - a)}[name]
    np.testing.assert_allclose(record["val_eps_mse_t"], (factor * torch.tensor(record["val_loss_t"])).numpy(),
                               rtol=2e-4)


class Items(torch.utils.data.Dataset):
    """Dataset items as the toolkit's datasets give them: x with its condition fields."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "class_labels": self.labels[i]}


def test_validation_images_are_evenly_spaced_and_latents_fixed():
    images = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 2, 2, 2)
    x0, condition = validation_images(Items(images, torch.arange(10)), 4, "class")
    assert condition["class_labels"].tolist() == [0, 3, 6, 9] and x0[:, 0, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0]
    assert validation_images(Items(images, torch.arange(10)), 4, "none")[1] == {}  # labels of unconditional models
    moments = torch.cat([torch.ones(10, 2, 2, 2), torch.zeros(10, 2, 2, 2)], 1)  # mean 1, log-variance 0
    a, _ = validation_images(Items(moments, torch.arange(10)), 4, "class", seed=1, latent_scale=0.5)
    b, _ = validation_images(Items(moments, torch.arange(10)), 4, "class", seed=1, latent_scale=0.5)
    assert a.shape == (4, 2, 2, 2) and torch.equal(a, b) and not torch.allclose(a, torch.full_like(a, 0.5))
    with pytest.raises(ValueError, match=r"num_images=11 but the held-out set has only 10 images"):
        validation_images(Items(images, torch.arange(10)), 11, "class")


def test_held_out_splits(tmp_path):
    kept, held = holdout_split(10, 3)
    assert held == [0, 4, 9] and sorted(kept + held) == list(range(10))
    digits = dict(kind="digits", resolution=8, channels=1, num_classes=10, val_split="holdout", holdout=256)
    train, val = build_dataset(digits), build_validation_dataset(digits)
    assert (len(train), len(val)) == (1797 - 256, 256)
    train_images = {train[i]["x"].numpy().tobytes() for i in range(len(train))}
    assert not any(val[i]["x"].numpy().tobytes() in train_images for i in range(len(val)))  # never trained on
    assert len(build_dataset({**digits, "max_images": 16})) == 16
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x[:12], y_train=np.arange(12) % 3, x_test=x[12:], y_test=np.arange(8) % 3)
    npz = dict(kind="npz", path=str(tmp_path / "d.npz"), resolution=8, channels=1, num_classes=3, val_split="test")
    test = build_validation_dataset(npz)
    assert len(test) == 8 and len(build_dataset(npz)) == 12
    np.testing.assert_array_equal(test.images[:, 0].numpy(), x[12:])
    np.savez(tmp_path / "adm.npz", arr_0=x)
    for path, message in [(tmp_path / "adm.npz", r"no array 'x_test'"),
                          (f"{tmp_path / 'd.npz'}:x_test", r"names the array 'x_test'")]:
        with pytest.raises(ValueError, match=message):
            build_validation_dataset({**npz, "path": str(path), "num_classes": 0})
    with pytest.raises(ValueError, match=r"data=digits has no test split: set data.val_split=holdout"):
        build_validation_dataset({**digits, "val_split": "test"})


@pytest.fixture(scope="module")
def val_npz(tmp_path_factory):
    """16 training and 8 test digits of 8x8 (random pixels, labels 0..2)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("val") / "split.npz"
    x = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    np.savez(path, x_train=x[:16], y_train=np.arange(16) % 3, x_test=x[16:], y_test=np.arange(8) % 3)
    return path


def val_run(path, run_dir, *extra):
    return train_config("data=npz", f"data.path={path}", "data.channels=1", "data.resolution=8", "data.num_classes=3",
                        *TINY, "val.every=2", "val.num_images=6", "val.num_timesteps=3", "val.batch_size=4",
                        f"run_dir={run_dir}", *extra)


def test_training_logs_the_validation_loss_and_resume_repeats_it(val_npz, tmp_path):
    run = train_script.train(val_run(val_npz, tmp_path / "run"))
    records = [r for r in read_metrics(run) if "val_loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert len(r["val_loss_t"]) == len(r["val_eps_mse_t"]) == len(r["val_timesteps"]) == 3
        assert r["val_num_images"] == 6 and r["val_seconds"] > 0 and np.isfinite(r["val_loss"])
        assert r["val_loss"] == pytest.approx(np.mean(r["val_loss_t"]))
    # The logged numbers are those of the exported EMA on the held-out images.
    resumed = tmp_path / "resumed"
    train_script.train(val_run(val_npz, resumed, "train.steps=2"))
    train_script.train(val_run(val_npz, resumed))  # resume=auto, now to step 4
    assert_same_weights(final_ema(resumed), final_ema(run), atol=1e-6)
    again = [r for r in read_metrics(resumed) if "val_loss" in r]
    assert [r["step"] for r in again] == [2, 4]
    for a, b in zip(again, records, strict=True):
        np.testing.assert_allclose(a["val_loss_t"], b["val_loss_t"], rtol=1e-5)
        np.testing.assert_allclose(a["val_eps_mse_t"], b["val_eps_mse_t"], rtol=1e-5)


def test_flow_run_logs_both_losses(val_npz, tmp_path):
    run = train_script.train(val_run(val_npz, tmp_path / "fm", "diffusion.objective=flow_matching",
                                     "sample.scheduler=flow_euler", "val.ema=false", "train.steps=2"))
    (record,) = [r for r in read_metrics(run) if "val_loss" in r]
    np.testing.assert_allclose(record["val_timesteps"], [1000 / 6, 500, 5000 / 6], rtol=1e-5)
    # ε̂ − ε = (1 − t)·(v̂ − v) for a flow model
    factor = (1 - np.array(record["val_timesteps"]) / 1000) ** 2
    np.testing.assert_allclose(record["val_eps_mse_t"], factor * np.array(record["val_loss_t"]), rtol=2e-4)


@pytest.mark.parametrize("overrides,match", [
    (["data=digits", "val.every=2", "data.val_split=test"], r"data=digits has no test split for the validation loss"),
    (["val.every=2", "data.holdout=100"], r"val.num_images=256 but data.holdout=100 items are held out"),
    (["val.every=2", "val.num_timesteps=0"], r"val.num_timesteps=0: out of range; set val.num_timesteps to an integer "
                                             r">= 1"),
    (["data.val_split=train"], r"data.val_split='train': choose one of \('test', 'holdout'\)"),
])
def test_val_config_errors_stop_before_training(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train_script.train(train_config(*overrides, *TINY, f"run_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_its_training_set(tmp_path):
    """A run started before held-out splits keeps training on all its data; a started run's split cannot change."""
    run_dir = tmp_path / "run"
    digits = ["data.resolution=8", *TINY, "train.steps=2", f"run_dir={run_dir}"]
    train_script.train(train_config(*digits))
    config = run_dir / "config.yaml"
    assert "holdout: 256" in config.read_text()
    with pytest.raises(ValueError, match=r"would change what defines its training:\n  data.holdout: 256 \(the run\) → "
                                         r"100 \(now\)"):
        train_script.train(train_config(*digits, "data.holdout=100", "train.steps=4"))
    # The run as written before held-out splits (and before provenance records): no split in config.yaml.
    config.write_text(config.read_text().replace("  holdout: 256\n", "").replace("  val_split: holdout\n", ""))
    for checkpoint in list_checkpoints(run_dir):
        (checkpoint / PROVENANCE).unlink()
        write_manifest(checkpoint)
    with pytest.raises(ValueError, match=r"trained on all of data=digits, so none is held out .* val.every=0"):
        train_script.train(train_config(*digits, "train.steps=4", "val.every=2"))
    train_script.train(train_config(*digits, "train.steps=4"))  # before held-out splits: resumes on all 1,797
    assert "holdout: 0" in config.read_text()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
