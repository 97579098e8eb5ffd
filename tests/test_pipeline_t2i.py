"""UViTText2ImagePipeline: prompts, the empty prompt as the unconditional branch, negative prompts, embeddings,
save/load with the text encoder, the shared denoising loop, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny_clip_text, tiny_clip_text_config, tiny_pipeline, tiny_t2i_pipeline, tiny_vae_dir
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from uvit_cog import UViTPipeline, UViTText2ImagePipeline, load_pipeline
from uvit_cog.text import encode_prompts

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = dict(num_inference_steps=3)


def features(pipe, prompts):
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, pipe.transformer.config.num_text_tokens)


def record_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (args[0].shape[0], kwargs.get("encoder_hidden_states"))), with_kwargs=True)
    return calls


def test_prompts_give_images_of_every_output_type():
    pipe = tiny_t2i_pipeline()
    pil = pipe(["a red cat", "a blue dog"], generator=torch.manual_seed(0), **STEPS).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    np_images = pipe(["a red cat", "a blue dog"], generator=torch.manual_seed(0), output_type="np", **STEPS).images
    assert np_images.shape == (2, 8, 8, 3) and np.isfinite(np_images).all()
    np.testing.assert_array_equal(np.asarray(pil[1]), (np_images[1] * 255).round().astype(np.uint8))
    (pt,) = pipe("a red cat", generator=torch.manual_seed(0), output_type="pt", return_dict=False, **STEPS)
    assert pt.shape == (1, 3, 8, 8)
    latent = pipe("a red cat", generator=torch.manual_seed(0), output_type="latent", **STEPS).images
    torch.testing.assert_close(pipe.decode_latents(latent), pt)


def test_unconditional_branch_is_the_empty_prompts_features_in_one_batched_call():
    """Guidance: one forward of 2N rows per step, the second half the features of "" (U-ViT's null context)."""
    pipe = tiny_t2i_pipeline()
    calls = record_calls(pipe.transformer)
    pipe(["a cat", "a dog"], guidance_scale=3.0, generator=torch.manual_seed(0), **STEPS)
    assert len(calls) == 3 and all(batch == 4 for batch, _ in calls)
    ehs = calls[0][1]
    torch.testing.assert_close(ehs[:2], features(pipe, ["a cat", "a dog"]))
    torch.testing.assert_close(ehs[2:], features(pipe, ["", ""]))
    calls.clear()
    pipe(["a cat", "a dog"], guidance_scale=1.0, generator=torch.manual_seed(0), **STEPS)
    assert all(batch == 2 for batch, _ in calls)  # no unconditional pass


def test_guidance_combines_the_two_predictions_as_diffusers_does():
    """pred = uncond + g·(cond − uncond): the official cond + s·(cond − uncond) with s = g − 1."""
    pipe = tiny_t2i_pipeline(scheduler="ddim")
    g, noise = 2.0, torch.randn(1, 3, 8, 8, generator=torch.manual_seed(1))
    guided = pipe("a cat", guidance_scale=g, latents=noise, output_type="latent", num_inference_steps=1).images
    cond, uncond = features(pipe, ["a cat"]), features(pipe, [""])
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        eps_c = pipe.transformer(noise, t, encoder_hidden_states=cond).sample
        eps_u = pipe.transformer(noise, t, encoder_hidden_states=uncond).sample
    official = eps_c + (g - 1) * (eps_c - eps_u)
    expected = pipe.scheduler.step(official, t, noise).prev_sample
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)


def test_prompt_embeds_and_negative_prompts():
    pipe = tiny_t2i_pipeline()
    kwargs = dict(guidance_scale=2.5, output_type="np", **STEPS)
    by_text = pipe(["a cat", "a dog"], generator=torch.manual_seed(0), **kwargs).images
    by_embeds = pipe(prompt_embeds=features(pipe, ["a cat", "a dog"]), generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(by_embeds, by_text, atol=1e-6)
    empty = pipe(["a cat", "a dog"], negative_prompt="", generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(empty, by_text, atol=1e-6)
    negative = pipe(["a cat", "a dog"], negative_prompt="blurry", generator=torch.manual_seed(0), **kwargs).images
    assert np.abs(negative - by_text).max() > 1e-3
    per_prompt = pipe(["a cat", "a dog"], negative_prompt=["blurry", ""], generator=torch.manual_seed(0),
                      **kwargs).images
    np.testing.assert_allclose(per_prompt[0], negative[0], atol=1e-6)
    np.testing.assert_allclose(per_prompt[1], by_text[1], atol=1e-6)
    neg_embeds = pipe(["a cat", "a dog"], negative_prompt_embeds=features(pipe, ["blurry"]),
                      generator=torch.manual_seed(0), **kwargs).images
    np.testing.assert_allclose(neg_embeds, negative, atol=1e-6)


def test_num_images_per_prompt_and_per_image_generators():
    pipe = tiny_t2i_pipeline()
    gens = lambda n: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    images = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=gens(4), output_type="np", **STEPS).images
    assert images.shape == (4, 8, 8, 3)
    # Image 3 (the second of "a dog") does not depend on the batch it was drawn in.
    alone = pipe("a dog", generator=[torch.Generator().manual_seed(3)], output_type="np", **STEPS).images
    np.testing.assert_allclose(alone[0], images[3], atol=1e-5)
    nested = pipe([["a cat"], ["a dog"]], generator=gens(2), output_type="np", **STEPS).images
    assert nested.shape == (2, 8, 8, 3)


def test_height_width_only_when_they_match():
    pipe = tiny_t2i_pipeline()
    assert pipe("a cat", height=8, width=8, **STEPS).images[0].size == (8, 8)
    with pytest.raises(ValueError, match="height=16, but this model makes 8x8 images only"):
        pipe("a cat", height=16, **STEPS)


def test_latent_model_decodes_through_its_vae(tmp_path):
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir(tmp_path / "vae"))
    pipe = tiny_t2i_pipeline(vae=vae)
    assert pipe.vae_scale_factor == 2
    images = pipe("a cat", height=16, width=16, output_type="np", generator=torch.manual_seed(0), **STEPS).images
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="makes 16x16"):
        pipe("a cat", height=8, **STEPS)


def test_save_load_round_trip_with_text_encoder(tmp_path):
    pipe = tiny_t2i_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "UViTText2ImagePipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["objective"] == "ddpm"
    loaded = load_pipeline(tmp_path / "pipe")
    assert isinstance(loaded, UViTText2ImagePipeline)
    loaded.set_progress_bar_config(disable=True)
    a = pipe(["a cat"], guidance_scale=2.0, generator=torch.manual_seed(0), output_type="np", **STEPS).images
    b = loaded(["a cat"], guidance_scale=2.0, generator=torch.manual_seed(0), output_type="np", **STEPS).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    # diffusers' generic loader, in a fresh process (the saved pipeline.py names this class).
    path = str(tmp_path / "pipe")
    script = (f"from diffusers import DiffusionPipeline; p = DiffusionPipeline.from_pretrained({path!r}, "
              f"custom_pipeline={path!r}, trust_remote_code=True); print(type(p).__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "UViTText2ImagePipeline", out.stderr[-2000:]


def test_text_encoder_from_a_saved_folder_loads_through_the_real_code_path(tmp_path):
    from uvit_cog.text import load_text_encoder
    folder = save_tiny_clip_text(tmp_path / "clip")
    encoder, tokenizer = load_text_encoder(folder, subfolder="text_encoder")
    pipe = tiny_t2i_pipeline()
    pipe.text_encoder, pipe.tokenizer = encoder, tokenizer
    assert not any(p.requires_grad for p in encoder.parameters())
    assert features(pipe, ["x"]).shape == (1, 8, 32)


def test_each_pipeline_refuses_the_other_kind_of_model():
    t2i = tiny_t2i_pipeline()
    with pytest.raises(ValueError, match="text-conditional: sample it with UViTText2ImagePipeline"):
        UViTPipeline(t2i.transformer, t2i.scheduler)
    cls_pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="not text-conditional"):
        UViTText2ImagePipeline(cls_pipe.transformer, cls_pipe.scheduler, None, t2i.text_encoder, t2i.tokenizer)


def test_a_text_encoder_of_another_width_is_refused():
    t2i = tiny_t2i_pipeline()
    wide = CLIPTextModel(tiny_clip_text_config(hidden_size=48))
    with pytest.raises(ValueError, match="width 48 but the model takes text_dim=32"):
        UViTText2ImagePipeline(t2i.transformer, t2i.scheduler, None, wide, t2i.tokenizer)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of prompt and prompt_embeds"),
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 8, 32)), "exactly one of prompt and prompt_embeds"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=["a", 3]), "prompt must be a string or a list of strings"),
    (dict(prompt="a", negative_prompt="b", negative_prompt_embeds=torch.zeros(1, 8, 32)), "at most one of"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), r"prompt_embeds must be \(N, 8, 32\)"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "3 negative prompts for 2 prompts"),
    (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(prompt="a", guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(prompt="a", num_inference_steps=0), "num_inference_steps must be a positive int"),
    (dict(prompt="a", output_type="jpg"), "unknown output_type"),
    (dict(prompt="a", width=9), "width=9"),
])
def test_bad_inputs_raise_before_sampling(kwargs, message):
    pipe = tiny_t2i_pipeline()
    calls = record_calls(pipe.transformer)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    assert not calls


def test_without_text_encoder_embeddings_still_sample():
    pipe = tiny_t2i_pipeline()
    embeds, empty = features(pipe, ["a cat"]), features(pipe, [""])
    bare = UViTText2ImagePipeline(pipe.transformer, pipe.scheduler, None, None, None)
    bare.set_progress_bar_config(disable=True)
    a = bare(prompt_embeds=embeds, negative_prompt_embeds=empty, generator=torch.manual_seed(0), output_type="np",
             **STEPS).images
    b = pipe("a cat", generator=torch.manual_seed(0), output_type="np", **STEPS).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="no text encoder"):
        bare("a cat", **STEPS)

