"""UViTPipeline: every scheduler, classifier-free guidance, determinism, save/load, the latent path, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from PIL import Image

from uvit_cog import UViTModel, UViTPipeline, load_pipeline
from uvit_cog.model import UViTModelOutput
from uvit_cog.schedule import SCHEDULERS, make_scheduler, scheduler_config

ROOT = Path(__file__).resolve().parents[1]
NAMES = {0: "cat", 1: "dog, puppy", 2: "bird"}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(num_classes: int = 3, **overrides) -> UViTModel:
    torch.manual_seed(0)
    cfg = dict(sample_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)
    if num_classes == 3:
        cfg["id2label"] = NAMES
    return UViTModel(**{**cfg, **overrides}).eval()


def tiny_pipeline(num_classes: int = 3, scheduler: str = "ddim", prediction_type: str = "epsilon",
                  vae: AutoencoderKL | None = None, **overrides) -> UViTPipeline:
    """A randomly initialised tiny pipeline (8x8 images, 3 classes named cat / dog, puppy / bird)."""
    scheduler = make_scheduler(scheduler, scheduler_config("linear", prediction_type))
    pipe = UViTPipeline(tiny_model(num_classes, **overrides), scheduler, vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_calls(model: torch.nn.Module) -> list[tuple[int, torch.Tensor | None]]:
    """Record (batch size, class labels) of every forward call of `model`."""
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs.get("class_labels"))), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_gives_images(scheduler):
    pipe = tiny_pipeline(scheduler=scheduler)
    images = pipe(batch_size=2, class_labels=[0, 2], num_inference_steps=4, guidance_scale=1.5,
                  generator=torch.manual_seed(0), output_type="np").images
    assert isinstance(images, np.ndarray) and images.shape == (2, 8, 8, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.01  # not a constant image


def test_output_types():
    pipe = tiny_pipeline()
    kwargs = dict(batch_size=2, num_inference_steps=2, class_labels=1)
    pil = pipe(**kwargs, generator=torch.manual_seed(0)).images
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "RGB" for im in pil)
    pt = pipe(**kwargs, generator=torch.manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 3, 8, 8) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    (np_images,) = pipe(**kwargs, generator=torch.manual_seed(0), output_type="np", return_dict=False)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_images[0] * 255).round().astype(np.uint8))


MU, STD = torch.tensor([-0.4, 0.1, 0.5]).view(1, 3, 1, 1), 0.5


class GaussianOracle(UViTModel):
    """The exact denoiser for data ~ N(MU, STD²) per pixel, in the parametrisation of `prediction_type`.

    Any scheduler driven correctly by the pipeline (initial noise scale, input scaling, timesteps,
    prediction type) must then turn noise into samples with about that mean and standard deviation.
    """

    def set_schedule(self, config: dict) -> None:
        alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod.double()
        self.log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log()
        self.prediction_type = config["prediction_type"]

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[:1]
        lo = t.floor().long()  # fractional timesteps (KDPM2): log-sigma interpolation, as the schedulers do
        hi, w = (lo + 1).clamp(max=len(self.log_sigmas) - 1), t - lo
        sigma = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        a = 1 / (1 + sigma**2)  # alpha_bar(t)
        x = sample.double()
        x0 = MU + a.sqrt() * STD**2 / (a * STD**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
        return UViTModelOutput(sample=out[self.prediction_type].to(sample.dtype))


# diffusers' Euler-a, KDPM2 and PNDM do not implement prediction_type="sample".
UNSUPPORTED = {("euler_a", "sample"), ("kdpm2", "sample"), ("pndm", "sample")}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_schedulers_sample_the_data_distribution(scheduler, prediction_type):
    config = scheduler_config("linear", prediction_type)
    oracle = GaussianOracle(sample_size=16, patch_size=2, embed_dim=8, depth=2, num_heads=2)
    oracle.set_schedule(config)

    def sample():
        pipe = UViTPipeline(oracle, make_scheduler(scheduler, config))
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=16, num_inference_steps=25, generator=torch.manual_seed(0), output_type="pt").images

    if (scheduler, prediction_type) in UNSUPPORTED:  # refused loudly by diffusers, never silently wrong
        with pytest.raises((NotImplementedError, ValueError), match="sample"):
            sample()
        return
    x = sample() * 2 - 1
    # Bounds leave room for 25-step discretisation (the last step lands on a posterior mean, so the spread
    # is a little low); a missing init_noise_sigma gives std ~0.003, a missing scale_model_input std ~1.
    assert (x.mean((0, 2, 3)) - MU.flatten()).abs().max() < 0.1
    assert ((x.std((0, 2, 3)) > 0.6 * STD) & (x.std((0, 2, 3)) < 1.1 * STD)).all(), x.std((0, 2, 3))


def test_guidance_is_one_batched_call_per_step():
    pipe = tiny_pipeline()
    calls = count_calls(pipe.transformer)
    outputs, step_inputs = [], []
    pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out.sample.clone()))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda pred, t, x, **kw: step_inputs.append(pred.clone()) or step(pred, t, x, **kw)
    g = 3.0
    pipe(class_labels=[0, 2], num_inference_steps=4, guidance_scale=g, generator=torch.manual_seed(0))
    assert len(calls) == 4 and all(batch == 4 for batch, _ in calls)
    assert calls[0][1].tolist() == [0, 2, 3, 3]  # cond labels, then the null label num_classes=3
    for out, pred in zip(outputs, step_inputs, strict=True):
        cond, uncond = out.chunk(2)
        torch.testing.assert_close(pred, uncond + g * (cond - uncond))  # every channel guided


def test_guidance_one_skips_unconditional_pass():
    pipe = tiny_pipeline()
    calls = count_calls(pipe.transformer)
    pipe(class_labels=["cat", "bird"], num_inference_steps=3, guidance_scale=1.0)
    assert len(calls) == 3 and all(batch == 2 and labels.tolist() == [0, 2] for batch, labels in calls)


def test_class_names_and_synonyms():
    pipe = tiny_pipeline()
    assert pipe.get_label_ids(["bird", "puppy", "dog", 0]) == [2, 1, 1, 0]
    assert pipe.get_label_ids(torch.tensor([2, 1])) == [2, 1]
    assert pipe.check_inputs(4, "cat", 2, 1.0) == [0, 0, 0, 0]  # one label for the whole batch
    assert pipe.check_inputs(1, [1, 2], 2, 1.0) == [1, 2]  # a list sets the batch size


def test_fixed_generator_and_per_image_generators():
    pipe = tiny_pipeline(scheduler="ddpm")  # stochastic: step noise also comes from the generators
    kwargs = dict(class_labels=[0, 1], num_inference_steps=3, guidance_scale=2.0, output_type="np")
    a = pipe(**kwargs, generator=torch.manual_seed(7)).images
    b = pipe(**kwargs, generator=torch.manual_seed(7)).images
    c = pipe(**kwargs, generator=torch.manual_seed(8)).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.01
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    pair = pipe(**kwargs, generator=gens(10, 11)).images
    alone = pipe(**{**kwargs, "class_labels": [1]}, generator=gens(11)).images
    np.testing.assert_allclose(pair[1], alone[0], atol=1e-5)  # image 1 does not depend on its batch


def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = tiny_pipeline(num_classes=0)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    images = pipe(batch_size=2, num_inference_steps=3, callback_on_step_end=callback, output_type="np").images
    assert seen == [(0, (2, 3, 8, 8)), (1, (2, 3, 8, 8)), (2, (2, 3, 8, 8))]
    np.testing.assert_allclose(images, 0.5)  # zero latents decode to mid-grey


def test_save_load_and_run_directories(tmp_path):
    pipe = tiny_pipeline(scheduler="dpm_solver", prediction_type="v_prediction")
    kwargs = dict(class_labels=["cat", "bird"], num_inference_steps=3, guidance_scale=1.5, output_type="np")
    expected = pipe(**kwargs, generator=torch.manual_seed(0)).images
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "pipeline.py").is_file()
    loaded = UViTPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.transformer.config.id2label == {str(k): v for k, v in NAMES.items()}
    np.testing.assert_array_equal(loaded(**kwargs, generator=torch.manual_seed(0)).images, expected)

    # Training-run layout: the final export wins, else the latest checkpoint's export.
    run = tmp_path / "run"
    for step in (500, 2000):
        pipe.transformer.pos_embed.data.fill_(step)
        pipe.save_pretrained(run / "checkpoints" / f"step_{step:07d}" / "pipeline")
    assert load_pipeline(run).transformer.pos_embed.flatten()[0] == 2000
    pipe.transformer.pos_embed.data.fill_(-1)
    pipe.save_pretrained(run / "pipeline")
    assert load_pipeline(run).transformer.pos_embed.flatten()[0] == -1

    # Swapping the sampler keeps the trained noise schedule and prediction type.
    euler = make_scheduler("euler", loaded.scheduler.config)
    assert euler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(euler.alphas_cumprod, loaded.scheduler.alphas_cumprod)


def test_diffusers_generic_loader_in_fresh_process(tmp_path):
    pipe = tiny_pipeline(num_classes=0)
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    script = (
        "import sys, torch, numpy as np\n"
        "from diffusers import DiffusionPipeline\n"
        "p = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True)\n"
        "assert type(p).__name__ == 'UViTPipeline' and type(p.transformer).__name__ == 'UViTModel', type(p)\n"
        "x = p(num_inference_steps=2, generator=torch.manual_seed(0), output_type='np').images\n"
        "np.save(sys.argv[2], x)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "pipe"), str(tmp_path / "x.npy")],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), expected)


def test_latent_model_decodes_through_vae(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=16, scaling_factor=0.5,
    ).eval()
    pipe = tiny_pipeline(vae=vae, sample_size=4, in_channels=4)
    images = pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.5,
                  generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(pipe.decode_latents(latents), expected)
    pipe.save_pretrained(tmp_path / "latent")
    assert json.loads((tmp_path / "latent" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert isinstance(load_pipeline(tmp_path / "latent").vae, AutoencoderKL)


@pytest.mark.parametrize(
    "num_classes,kwargs,message",
    [
        (3, dict(class_labels=3), "out of range"),
        (3, dict(class_labels=[0, -1]), "out of range"),
        (3, dict(class_labels="horse"), "unknown class name 'horse'"),
        (3, dict(class_labels=[]), "empty"),
        (3, dict(class_labels=[1.5]), "ints or class names"),
        (0, dict(guidance_scale=2.0), "unconditional"),
        (0, dict(class_labels=0), "unconditional"),
        (3, dict(guidance_scale=2.0), "needs class_labels"),
        (3, dict(num_inference_steps=0), "num_inference_steps"),
        (3, dict(batch_size=0), "batch_size"),
        (3, dict(batch_size=3, class_labels=[0, 1]), "2 class labels for batch_size=3"),
        (3, dict(batch_size=2, generator=[torch.Generator()]), "1 generators for 2 images"),
        (3, dict(output_type="latent"), "output_type"),
    ],
)
def test_bad_inputs_raise_before_sampling(num_classes, kwargs, message):
    pipe = tiny_pipeline(num_classes=num_classes)
    calls = count_calls(pipe.transformer)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    assert calls == []


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neither a pipeline directory"):
        load_pipeline(tmp_path / "run")
