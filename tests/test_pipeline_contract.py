"""The contract of diffusers' shared pipeline tests (`PipelineTesterMixin` in diffusers' repository,
tests/pipelines/test_pipelines_common.py), checked on both pipelines without diffusers' test files, which its
wheel does not ship. `scripts/diffusers_pipeline_tests.py` runs diffusers' own suite given a checkout
(docs/pipeline_contract.md); these are the points of it that matter here, restated from reading it, on the same
dummy components and inputs (`uvit_cog.testing`). Tolerances are the mixin's.
"""

import ast
import inspect
import textwrap

import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

from uvit_cog import UViTPipeline, UViTText2ImagePipeline
from uvit_cog.testing import dummy_components, dummy_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

# diffusers' canonical parameter sets (its tests/pipelines/pipeline_params.py), restated. Text-to-image:
# TEXT_TO_IMAGE_PARAMS less height/width (fixed by the model's position embedding) and cross_attention_kwargs.
PARAMS = {
    UViTText2ImagePipeline: {"prompt", "guidance_scale", "negative_prompt", "prompt_embeds", "negative_prompt_embeds"},
    UViTPipeline: {"class_labels"},  # CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS, as diffusers' DiT tests
}
BATCH_PARAMS = {UViTText2ImagePipeline: {"prompt", "negative_prompt"}, UViTPipeline: {"class_labels"}}
# PipelineTesterMixin.required_optional_params: parameters every pipeline takes with a default.
REQUIRED_OPTIONAL_PARAMS = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type",
                            "return_dict"}


@pytest.fixture(params=[UViTText2ImagePipeline, UViTPipeline], ids=["text", "class"])
def cls(request):
    return request.param


def make(cls, **replace):
    """A pipeline of `cls` on fresh dummy components (some replaced), progress bar off."""
    pipe = cls(**{**dummy_components(cls), **replace})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(cls, seed: int = 0, **extra) -> dict:
    return {**dummy_inputs(cls, torch.Generator("cpu").manual_seed(seed)), **extra}


def batched(cls, batch_size: int) -> dict:
    """The mixin's batch of `batch_size`: each batch parameter repeated (prompts shortened to 1/i of their length,
    the last one far past the tokenizer's length), one generator per image."""
    args = inputs(cls)
    for name in BATCH_PARAMS[cls] & args.keys():
        if name == "prompt":
            prompt = args[name]
            args[name] = [prompt[: len(prompt) // i] for i in range(1, batch_size)] + [100 * "very long"]
        else:
            args[name] = batch_size * [args[name]]
    args["generator"] = [torch.Generator("cpu").manual_seed(i) for i in range(batch_size)]
    return args


def test_call_signature_takes_the_parameter_sets(cls):
    parameters = inspect.signature(cls.__call__).parameters
    assert PARAMS[cls] <= parameters.keys()
    optional = {name for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert REQUIRED_OPTIONAL_PARAMS <= optional
    assert {"callback_on_step_end", "callback_on_step_end_tensor_inputs"} <= optional


def test_first_image_of_a_batch_is_the_single_image(cls):
    """The mixin's test_inference_batch_single_identical (batch 3, max diff 1e-4), and batches give one image each."""
    pipe = make(cls)
    single = pipe(**inputs(cls)).images
    batch = pipe(**batched(cls, 3)).images
    assert batch.shape == (3, *single.shape[1:])
    assert np.abs(batch[0] - single[0]).max() < 1e-4
    assert len(pipe(**batched(cls, 2)).images) == 2


def test_dict_and_tuple_outputs_agree(cls):
    pipe = make(cls)
    as_dict = pipe(**inputs(cls)).images
    (as_tuple,) = pipe(**inputs(cls), return_dict=False)
    assert np.abs(as_dict - as_tuple).max() < 1e-4


@pytest.mark.parametrize("without_vae", [False, True], ids=["vae", "vae=None"])
def test_save_and_load_give_the_same_images(cls, without_vae, tmp_path):
    """test_save_load_local (5e-4) and test_save_load_optional_components (1e-4, every optional component None)."""
    pipe = make(cls)
    if without_vae:
        assert pipe._optional_components == ["vae"]
        pipe.vae = None
    before = pipe(**inputs(cls)).images
    pipe.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.vae is None) == without_vae
    assert np.abs(loaded(**inputs(cls)).images - before).max() < (1e-4 if without_vae else 5e-4)


def test_encode_prompt_in_isolation():
    """A pipeline holding only the text encoder and tokenizer encodes the prompts; one without them samples from
    the features, passed by the names `encode_prompt` returns them as; the images are the full pipeline's."""
    cls, components = UViTText2ImagePipeline, dummy_components(UViTText2ImagePipeline)
    text_only = cls(**{k: v if k in ("text_encoder", "tokenizer") else None for k, v in components.items()})
    args = inputs(cls)
    with torch.no_grad():
        prompt_embeds, negative_prompt_embeds = text_only.encode_prompt(args.pop("prompt"))
    no_text = cls(**{**components, "text_encoder": None, "tokenizer": None})
    no_text.set_progress_bar_config(disable=True)
    images = no_text(**args, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds).images
    full = cls(**components)
    full.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(images, full(**inputs(cls)).images, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no text encoder/tokenizer: pass prompt_embeds"):
        no_text(**inputs(cls))
    # Without a transformer the prompt length is the encoder's positions; an encoder that has none (T5) cannot tell.
    t5 = T5EncoderModel(T5Config(vocab_size=514, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="text encoder names no max_position_embeddings"):
        cls(None, None, None, t5, components["tokenizer"]).encode_prompt("a cat")


def test_encode_prompt_returns_call_parameters_by_name():
    """diffusers' test reads the names of `encode_prompt`'s return statement from its source and passes the
    values to `__call__` by those names: each must be a plain name that `__call__` takes."""
    source = textwrap.dedent(inspect.getsource(UViTText2ImagePipeline.encode_prompt))
    returns = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Return)]
    assert len(returns) == 1 and isinstance(returns[0], ast.Tuple)
    names = [element.id if isinstance(element, ast.Name) else ast.unparse(element) for element in returns[0].elts]
    assert names == ["prompt_embeds", "negative_prompt_embeds"]
    assert set(names) <= inspect.signature(UViTText2ImagePipeline.__call__).parameters.keys()


def test_num_images_per_prompt(cls):
    pipe = make(cls)
    for batch_size in (1, 2):
        for per_prompt in (1, 2):
            args = inputs(cls)
            for name in BATCH_PARAMS[cls] & args.keys():
                args[name] = batch_size * [args[name]]
            assert len(pipe(**args, num_images_per_prompt=per_prompt).images) == batch_size * per_prompt


def test_step_callback_sees_and_replaces_the_latents(cls):
    pipe = make(cls)
    seen = []

    def callback(pipe, i, t, tensors):
        assert set(tensors) == set(pipe._callback_tensor_inputs) == {"latents"}
        seen.append(i)
        if i == pipe.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = pipe(**inputs(cls, output_type="latent"), callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs).images
    assert seen == [0, 1] and out.abs().sum() == 0
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs \['noise'\] are not available"):
        pipe(**inputs(cls), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_step_callback_may_change_the_guidance_scale(cls):
    """test_callback_cfg: a callback that adds 1 at each step leaves guidance_scale + num_timesteps."""
    pipe = make(cls)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))

    def more_guidance(pipe, i, t, tensors):
        pipe._guidance_scale += 1.0
        return tensors

    pipe(**inputs(cls, guidance_scale=2.0), callback_on_step_end=more_guidance)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps == 4.0
    assert calls == [2, 2]  # still one conditional and one unconditional row per image


def test_components_rebuild_the_pipeline(cls):
    components = dummy_components(cls)
    pipe = cls(**components)
    assert set(pipe.components) == set(components)
    rebuilt = cls(**pipe.components)
    for pipeline in (pipe, rebuilt):
        pipeline.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(rebuilt(**inputs(cls)).images, pipe(**inputs(cls)).images)


def test_to_dtype_casts_every_model(cls):
    pipe = make(cls)
    models = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert len(models) == (3 if cls is UViTText2ImagePipeline else 2)  # the tokenizer is no module
    assert all(m.dtype == torch.float32 for m in models)
    pipe.to(dtype=torch.float16)
    assert all(m.dtype == torch.float16 for m in models)


def test_float16_pipeline_matches_float32(cls, tmp_path):
    """test_float16_inference (cosine distance < 5e-2) and test_save_load_float16 (components stay float16, images
    within 1e-2), which diffusers runs on an accelerator only: here on the CPU, which runs float16 too."""
    full = make(cls)(**inputs(cls)).images.reshape(-1)
    half = make(cls).to(dtype=torch.float16)
    images = half(**inputs(cls)).images
    assert np.isfinite(images).all()
    cosine = full @ images.reshape(-1) / (np.linalg.norm(full) * np.linalg.norm(images))
    assert 1 - cosine < 5e-2
    half.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, dtype=torch.float16)
    loaded.set_progress_bar_config(disable=True)
    assert {c.dtype for c in loaded.components.values() if isinstance(c, torch.nn.Module)} == {torch.float16}
    assert np.abs(loaded(**inputs(cls)).images - images).max() < 1e-2


def test_variant_round_trip(cls, tmp_path):
    """test_loading_with_variants / test_loading_with_incorrect_variants_raises_error."""
    pipe = make(cls)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    loaded = cls.from_pretrained(tmp_path / "fp16", variant="fp16")
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            weights = dict(getattr(loaded, name).named_parameters())
            for key, value in component.named_parameters():
                assert torch.equal(weights[key], value), (name, key)
    pipe.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="variant=fp16"):
        cls.from_pretrained(tmp_path / "plain", variant="fp16")
