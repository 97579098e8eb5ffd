"""UViTPipeline: every scheduler, classifier-free guidance, determinism, save/load, the latent path, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from uvit_cog import UViTModel, UViTPipeline, load_pipeline
from uvit_cog.model import UViTModelOutput
from uvit_cog.schedule import SCHEDULERS, UNSUPPORTED_PREDICTIONS, make_scheduler, scheduler_config
from uvit_cog.testing import TINY_NAMES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


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
    # "latent": the model-space samples before decoding (here pixels in [-1, 1] beyond the clamp).
    latent = pipe(**kwargs, generator=torch.manual_seed(0), output_type="latent").images
    assert latent.shape == (2, 3, 8, 8) and (latent.min() < 0 or latent.max() > 1)
    torch.testing.assert_close(pipe.decode_latents(latent), pt)
    for output_type in ("pil", "pt", "latent"):  # return_dict=False: the same images as a 1-tuple
        (images,) = pipe(**kwargs, generator=torch.manual_seed(0), output_type=output_type, return_dict=False)
        expected = {"pil": pil, "pt": pt, "latent": latent}[output_type]
        if output_type == "pil":
            assert [np.asarray(im).tolist() for im in images] == [np.asarray(im).tolist() for im in expected]
        else:
            torch.testing.assert_close(images, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "class_labels,ids",
    [
        (2, [2]),
        ("puppy", [1]),
        ([0, "bird"], [0, 2]),
        ([[1], [1]], [1, 1]),  # how diffusers' shared tests batch the input [1]
        ([[0, "dog"], (2,), [[1]]], [0, 1, 2, 1]),
        (torch.tensor(2), [2]),
        (torch.tensor([[2, 0], [1, 1]]), [2, 0, 1, 1]),
        ([torch.tensor([1, 0]), torch.tensor(2)], [1, 0, 2]),
        (np.array([[2], [0]]), [2, 0]),
    ],
)
def test_class_labels_in_any_form_dit_accepts(class_labels, ids):
    """Ints, names, nested lists / tuples, tensors and arrays of any shape: flattened in order."""
    pipe = tiny_pipeline()
    assert pipe.get_label_ids(class_labels) == ids
    calls = count_calls(pipe.transformer)
    images = pipe(class_labels=class_labels, num_inference_steps=1, output_type="np").images
    assert images.shape == (len(ids), 8, 8, 3) and calls[0][1].tolist() == ids


def test_nested_batch_equals_single_image():
    """diffusers' batch tests: input [1] batched as [[1], [1], [1]] with one generator per image."""
    pipe = tiny_pipeline(scheduler="ddpm")  # step noise from the generators too
    kwargs = dict(num_inference_steps=3, guidance_scale=1.5, output_type="np")
    single = pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), **kwargs).images
    batch = pipe(class_labels=[[1]] * 3, generator=[torch.Generator().manual_seed(i) for i in range(3)],
                 **kwargs).images
    assert batch.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(batch[0], single[0], atol=1e-5)
    assert np.abs(batch[1] - batch[0]).max() > 0.01  # its own generator, its own image
    for output_type in ("pil", "pt", "latent"):  # batch consistency: one image per nested entry
        output = pipe(class_labels=[[1], [1]], num_inference_steps=1, output_type=output_type)
        assert len(output[0]) == 2


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("num_images_per_prompt", [1, 2])
def test_num_images_per_prompt(batch_size, num_images_per_prompt):
    pipe = tiny_pipeline()
    calls = count_calls(pipe.transformer)
    images = pipe(class_labels=[[1]] * batch_size, num_images_per_prompt=num_images_per_prompt,
                  num_inference_steps=1, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape[0] == batch_size * num_images_per_prompt
    assert calls[0][1].tolist() == [1] * (batch_size * num_images_per_prompt)


def test_num_images_per_prompt_order_and_unconditional():
    pipe = tiny_pipeline()
    calls = count_calls(pipe.transformer)
    pipe(class_labels=["cat", "bird"], num_images_per_prompt=2, num_inference_steps=1)
    assert calls[0][1].tolist() == [0, 0, 2, 2]  # each label's images together, as diffusers repeats prompts
    uncond = tiny_pipeline(num_classes=0)
    images = uncond(batch_size=2, num_images_per_prompt=3, num_inference_steps=1, output_type="pt").images
    assert images.shape == (6, 3, 8, 8)


def test_given_latents_replace_drawn_noise():
    pipe = tiny_pipeline(scheduler="euler")  # init_noise_sigma != 1: given latents are scaled like drawn ones
    assert pipe.scheduler.init_noise_sigma > 100
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    drawn = pipe(class_labels=[0, 2], num_inference_steps=2, generator=gens, output_type="np").images
    latents = randn_tensor((2, 3, 8, 8), generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    given = pipe(class_labels=[0, 2], num_inference_steps=2, latents=latents, output_type="np").images
    np.testing.assert_array_equal(given, drawn)


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


# diffusers' Euler-a, KDPM2 and PNDM do not implement prediction_type="sample": refused by make_scheduler, before work.
UNSUPPORTED = {(name, p) for name, types in UNSUPPORTED_PREDICTIONS.items() for p in types}


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

    if (scheduler, prediction_type) in UNSUPPORTED:  # refused before any step, never silently wrong
        with pytest.raises(ValueError, match="cannot sample a model that predicts 'sample'"):
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


def test_callback_tensor_inputs():
    """diffusers' callback contract: only the requested tensors (a subset of `_callback_tensor_inputs`) are
    passed, and a tensor returned at the last step is the output."""
    pipe = tiny_pipeline()
    seen = []

    def record(p, i, t, tensors):
        seen.append(sorted(tensors))
        return tensors

    pipe(class_labels=1, num_inference_steps=2, callback_on_step_end=record, callback_on_step_end_tensor_inputs=[])
    pipe(class_labels=1, num_inference_steps=2, callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert seen == [[], [], ["latents"], ["latents"]]

    def zero_last(p, i, t, tensors):
        if i == p.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = pipe(class_labels=1, num_inference_steps=3, callback_on_step_end=zero_last, output_type="latent")[0]
    assert pipe.num_timesteps == 3 and out.abs().sum() == 0

    class ZeroLatents(PipelineCallback):  # diffusers' callback classes bring their own tensor_inputs
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    out = pipe(class_labels=1, num_inference_steps=2, output_type="latent", callback_on_step_end_tensor_inputs=[],
               callback_on_step_end=MultiPipelineCallbacks([ZeroLatents()]))[0]
    assert out.abs().sum() == 0


def test_callback_changes_guidance_scale():
    """A callback may raise `pipe._guidance_scale` between steps; each step guides with the current value."""
    pipe = tiny_pipeline()
    outputs, step_inputs = [], []
    pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out.sample.clone()))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda pred, t, x, **kw: step_inputs.append(pred.clone()) or step(pred, t, x, **kw)

    def increase(p, i, t, tensors):
        p._guidance_scale += 1.0
        return tensors

    pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, callback_on_step_end=increase)
    assert pipe.do_classifier_free_guidance and pipe.guidance_scale == 2.0 + pipe.num_timesteps
    for i, (out, pred) in enumerate(zip(outputs, step_inputs, strict=True)):
        cond, uncond = out.chunk(2)
        torch.testing.assert_close(pred, uncond + (2.0 + i) * (cond - uncond))


def test_save_load_and_run_directories(tmp_path):
    pipe = tiny_pipeline(scheduler="dpm_solver", prediction_type="v_prediction")
    kwargs = dict(class_labels=["cat", "bird"], num_inference_steps=3, guidance_scale=1.5, output_type="np")
    expected = pipe(**kwargs, generator=torch.manual_seed(0)).images
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "pipeline.py").is_file()
    loaded = UViTPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.transformer.config.id2label == {str(k): v for k, v in TINY_NAMES.items()}
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


def tiny_vae() -> AutoencoderKL:
    """A random 2-block `AutoencoderKL` (4 latent channels, 2x downsampling, scaling factor 0.5)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=16, scaling_factor=0.5,
    ).eval()


def test_optional_vae_none_round_trips(tmp_path):
    """diffusers' optional-components contract: `vae=None` survives `components`, the constructor,
    `save_pretrained` (also over a directory that held a VAE) and `from_pretrained`."""
    latent = tiny_pipeline(vae=tiny_vae(), sample_size=4, in_channels=4)
    assert set(latent.components) == {"transformer", "scheduler", "vae"}
    latent.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae").is_dir()

    latent.vae = None  # as diffusers' test does: set every optional component to None
    assert latent.components["vae"] is None and latent.config["vae"] == (None, None)
    kwargs = dict(class_labels=[0, 2], num_inference_steps=2, output_type="pt")
    expected = latent(**kwargs, generator=torch.manual_seed(0)).images
    assert expected.shape == (2, 4, 4, 4)  # undecoded model space: no VAE any more
    latent.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["vae"] == [None, None]
    loaded = UViTPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and set(loaded.components) == {"transformer", "scheduler", "vae"}
    torch.testing.assert_close(loaded(**kwargs, generator=torch.manual_seed(0)).images, expected, rtol=0, atol=0)
    rebuilt = UViTPipeline(**loaded.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert rebuilt.vae is None and rebuilt.config["vae"] == (None, None)
    torch.testing.assert_close(rebuilt(**kwargs, generator=torch.manual_seed(0)).images, expected, rtol=0, atol=0)

    # A saved VAE can be left out at load time, and fp16 variants load as such.
    with_vae = tiny_pipeline(vae=tiny_vae(), sample_size=4, in_channels=4)
    with_vae.save_pretrained(tmp_path / "vae")
    assert UViTPipeline.from_pretrained(tmp_path / "vae", vae=None).vae is None
    with_vae.to(dtype=torch.float16)
    assert with_vae.transformer.dtype == torch.float16 and with_vae.vae.dtype == torch.float16
    with_vae.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    fp16 = UViTPipeline.from_pretrained(tmp_path / "fp16", variant="fp16", dtype=torch.float16)
    assert fp16.transformer.dtype == torch.float16 and isinstance(fp16.vae, AutoencoderKL)


def test_call_signature_has_diffusers_parameters():
    """The parameters diffusers' `test_pipeline_call_signature` requires of a class-conditional pipeline."""
    import inspect

    params = inspect.signature(UViTPipeline.__call__).parameters
    optional = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                "return_dict", "guidance_scale", "callback_on_step_end", "callback_on_step_end_tensor_inputs"}
    assert "class_labels" in params
    assert {k for k in optional if params[k].default is not inspect.Parameter.empty} == optional


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
    vae = tiny_vae()
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
        (3, dict(class_labels=0, guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (3, dict(class_labels=0, guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (3, dict(class_labels=0, guidance_scale=True), "guidance_scale must be a finite number"),
        (3, dict(batch_size=0), "batch_size"),
        (3, dict(batch_size=3, class_labels=[0, 1]), "2 class labels for batch_size=3"),
        (3, dict(batch_size=2, generator=[torch.Generator()]), "1 generators for 2 images"),
        (3, dict(output_type="latents"), "output_type"),
        (3, dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (3, dict(class_labels=[[]]), "empty"),
        (3, dict(class_labels=torch.tensor([1.0])), "ints or class names"),
        (3, dict(class_labels=[[0], [True]]), "ints or class names"),
        (3, dict(callback_on_step_end_tensor_inputs=["noise_pred"]), r"\['noise_pred'\] are not available"),
        (3, dict(class_labels=[0, 1], latents=torch.zeros(1, 3, 8, 8)), r"2 images need \(2, 3, 8, 8\)"),
        (3, dict(class_labels=[[1], [1]], num_images_per_prompt=2, generator=[torch.Generator()] * 2),
         "2 generators for 4 images"),
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
