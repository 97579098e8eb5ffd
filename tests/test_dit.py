"""DiT as a backbone (uvit_cog.dit, uvit_cog.backbones): DiT's published sizes, diffusers' DiT with one shared
embedder, Cog placed with set_attention and kept through saves and copies, the pipeline on any DiT, and tiny
DiT-S/2-shaped runs and their Cog twins through train.py, sample.py, eval/score.py, compare.py and analyze.py."""

import copy
import inspect
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    DATA,
    ROOT,
    TINY,
    assert_same_weights,
    final_ema,
    final_model,
    train_config,
    train_script,
)
from diffusers import DiffusionPipeline, DiTTransformer2DModel
from PIL import Image
from threadpoolctl import threadpool_limits

from uvit_cog import load_model, load_pipeline, set_attention
from uvit_cog.backbones import backbone_arguments, build_backbone, condition_kind, num_classes
from uvit_cog.checkpoints import list_checkpoints
from uvit_cog.dit import DIT_PRESETS, DiTModel, SharedEmbedder, build_dit
from uvit_cog.pipeline import UViTPipeline
from uvit_cog.rundir import read_metrics
from uvit_cog.schedule import make_scheduler, scheduler_config

pytestmark = pytest.mark.usefixtures("single_thread")
EXPERIMENTS = ["cifar10_dit_s2", "imagenet256_dit_xl2"]
# DiT's logged parameter counts (facebookresearch/DiT train.py: `sum(p.numel() for p in model.parameters())` of
# DiT_models[name](input_size=32, num_classes=1000), learn_sigma on, the frozen sin-cos position table included);
# the paper rounds them to 33M, 130M, 458M and 675M.
DIT_COUNTS = {"dit-s2": 32_963_360, "dit-b2": 130_512_416, "dit-l2": 458_102_816, "dit-xl2": 675_129_632}
# A DiT-S/2-shaped model (2x2 patches, DiT's blocks) cut to 3 blocks of width 32 on 8x8 MNIST digits: the TINY run
# of the U-ViT tests (4 steps of 8 images, checkpoints every 2) with DiT's model fields.
DIT_TINY = ["model.hidden_size=32", "model.depth=3", "model.num_heads=2", "train.condition_dropout=0.1",
            *[o for o in TINY if not o.startswith("model.")]]
KINDS = {"dit_s2": ["softmax"] * 3, "dit_s2_cog": ["softmax", "cog", "softmax"]}


def dit_overrides(npz: Path, run_dir: Path, model: str = "dit_s2", *extra: str) -> list[str]:
    return ["data=npz", f"data.path={npz}", "data.channels=1", "data.resolution=8", f"model={model}", *DIT_TINY,
            f"run_dir={run_dir}", *extra]


def kinds(model: torch.nn.Module) -> list[str]:
    """The attention kind of each DiT block: the routed processor's, or softmax for diffusers' own."""
    return [getattr(b.attn1.processor, "_uvit_cog_kind", "softmax") for b in model.transformer_blocks]


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_dit(num_classes: int = 3, seed: int = 0, **overrides) -> DiTModel:
    """A tiny DiTModel (8x8x1, 3 blocks of width 32) with every weight random, so no output is trivially zero."""
    torch.manual_seed(seed)
    model = build_dit(**{**dict(hidden_size=32, depth=3, num_heads=2, patch_size=2, sample_size=8, in_channels=1,
                                num_classes=num_classes), **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def plain_dit(model: DiTModel) -> DiTTransformer2DModel:
    """diffusers' own DiTTransformer2DModel with `model`'s weights: the shared embedder copied into every block,
    as diffusers' conversion of DiT's checkpoints does."""
    keys = inspect.signature(DiTTransformer2DModel.__init__).parameters
    plain = DiTTransformer2DModel(**{k: v for k, v in model.config.items() if k in keys})
    state = model.state_dict()
    shared = {k: v for k, v in state.items() if k.startswith("transformer_blocks.0.norm1.emb.")}
    for i in range(1, len(model.transformer_blocks)):
        state |= {k.replace("blocks.0.", f"blocks.{i}.", 1): v for k, v in shared.items()}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def inputs(batch: int = 3, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, 8, 8, generator=g), torch.tensor([5, 400, 999][:batch])


# ----------------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("preset,count", DIT_COUNTS.items())
def test_published_parameter_counts(preset, count):
    width, depth = DIT_PRESETS[preset]["hidden_size"], DIT_PRESETS[preset]["depth"]
    with torch.device("meta"):
        sigma = build_dit(**DIT_PRESETS[preset], sample_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        trained = train_script.build_model(train_config("experiment=imagenet256_dit_xl2",
                                                        f"model={preset.replace('-', '_')}"))
        untied = DiTTransformer2DModel(num_attention_heads=sigma.config.num_attention_heads,
                                       attention_head_dim=sigma.config.attention_head_dim, in_channels=4,
                                       out_channels=8, num_layers=depth, sample_size=32, num_embeds_ada_norm=1000)
    assert type(trained) is DiTModel and trained.config.num_layers == depth and trained.inner_dim == width
    # DiT counts its frozen sin-cos position table as a parameter; diffusers keeps it as a buffer.
    assert sigma.pos_embed.pos_embed.numel() == 256 * width
    assert num_parameters(sigma) + sigma.pos_embed.pos_embed.numel() == count
    # learn_sigma off (what train.py trains): the final projection loses the variance half, 2·2·4 rows of width + 1.
    assert trained.config.out_channels == 4 and num_parameters(sigma) - num_parameters(trained) == 16 * (width + 1)
    # diffusers' own class trains a timestep MLP and a label table per block: depth - 1 extra copies.
    embedder = num_parameters(sigma.transformer_blocks[0].norm1.emb)
    assert embedder == (256 * width + width) + (width * width + width) + 1001 * width
    assert num_parameters(untied) == num_parameters(sigma) + (depth - 1) * embedder


def test_presets_and_backbone_arguments():
    assert DIT_PRESETS["dit-xl2"] == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    assert DIT_PRESETS["dit-b4"] == dict(hidden_size=768, depth=12, num_heads=12, patch_size=4)
    name, kwargs = backbone_arguments(dict(backbone="dit", preset="dit-s2", depth=3, hidden_size=None, num_classes=0))
    assert name == "dit" and kwargs == dict(hidden_size=384, depth=3, num_heads=6, patch_size=2, num_classes=0)
    assert backbone_arguments(dict(preset="uvit-small", depth=None)) == (
        "uvit", dict(embed_dim=512, depth=12, num_heads=8))  # no backbone field: a U-ViT, as every older run
    with pytest.raises(ValueError, match=r"preset='dit-s2' is no uvit size: choose one of \['uvit-huge'"):
        backbone_arguments(dict(preset="dit-s2"))
    with pytest.raises(ValueError, match=r"backbone='unet': choose one of \['dit', 'uvit'\]"):
        backbone_arguments(dict(backbone="unet"))


# ----------------------------------------------------------------------------------------------------------
# DiTModel: diffusers' DiT, trained as DiT


def test_dit_is_class_conditional_only_and_says_so():
    model = tiny_dit()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="class-conditional only"):
        model(x, torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 77, 32))
    with pytest.raises(ValueError, match="backbone=dit is not text-conditional"):
        build_backbone("dit", **DIT_PRESETS["dit-s2"], sample_size=8, in_channels=3, num_classes=3, text_dim=768)
    assert condition_kind(model.config) == "class" and condition_kind(tiny_dit(num_classes=0).config) == "none"


def test_dit_model_is_diffusers_dit_with_one_shared_embedder():
    model = tiny_dit()
    assert isinstance(model, DiTTransformer2DModel)
    first = model.transformer_blocks[0].norm1.emb
    assert all(isinstance(b.norm1.emb, SharedEmbedder) and b.norm1.emb.embedder is first
               for b in model.transformer_blocks[1:])
    assert not any(".1.norm1.emb" in k or ".2.norm1.emb" in k for k in model.state_dict())  # stored once
    x, t = inputs()
    y = torch.tensor([0, 2, 3])  # 3 is the null label
    torch.testing.assert_close(model(x, t, y).sample, plain_dit(model)(x, t, y).sample)
    # A copy (the EMA) shares its own embedder, not the original's.
    ema = copy.deepcopy(model)
    assert ema.transformer_blocks[2].norm1.emb.embedder is ema.transformer_blocks[0].norm1.emb is not first
    torch.testing.assert_close(ema(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)


def test_gradients_reach_every_parameter_with_and_without_checkpointing():
    """train.gradient_checkpointing re-runs the blocks, the shared embedder's calls included: the same gradients."""
    model = set_attention(tiny_dit().train(), "cog")
    x, t = inputs()
    y = torch.tensor([0, 1, 3])

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x, t, y).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    assert all(g.any() for g in plain)
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_dit_initialisation_is_dits():
    torch.manual_seed(0)
    model = build_dit(hidden_size=64, depth=2, num_heads=4, patch_size=2, sample_size=8, in_channels=3,
                      num_classes=10)
    x, t = inputs(channels=3)
    assert torch.equal(model(x, t, torch.tensor([1, 2, 3])).sample, torch.zeros_like(x))  # final layer at zero
    for block in model.transformer_blocks:  # adaLN-Zero: every block starts as the identity
        assert not block.norm1.linear.weight.any() and not block.norm1.linear.bias.any()
        bound = math.sqrt(6 / (64 + 3 * 64))  # xavier bound of DiT's fused qkv
        qkv = torch.cat([block.attn1.to_q.weight, block.attn1.to_k.weight, block.attn1.to_v.weight])
        assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound and not block.attn1.to_q.bias.any()
        fc = block.ff.net[0].proj.weight  # xavier of Linear(64, 256)
        assert fc.abs().max() <= math.sqrt(6 / (64 + 256)) and fc.abs().max() > 0.9 * math.sqrt(6 / (64 + 256))
    emb = model.transformer_blocks[0].norm1.emb
    assert emb.class_embedder.embedding_table.weight.shape == (11, 64)  # 10 classes + the null label
    assert emb.class_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert emb.timestep_embedder.linear_1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_labels_null_label_and_no_hidden_dropout():
    model = tiny_dit().train()  # diffusers' DiT would drop 10 % of labels by itself here
    x, t = inputs()
    y = torch.tensor([0, 1, 2])
    out = model(x, t, y).sample
    for _ in range(5):
        torch.testing.assert_close(model(x, t, y).sample, out, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t).sample, model(x, t, torch.full((3,), 3)).sample)  # None = null label 3
    assert not torch.allclose(model(x, t).sample, out)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or the null label 3; got min 0, max 4"):
        model(x, t, torch.tensor([0, 1, 4]))
    # Unconditional: the label table holds the null label only.
    uncond = tiny_dit(num_classes=0)
    assert uncond.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 1
    assert num_classes(uncond.config) == 0 and uncond(x, t).sample.shape == x.shape
    with pytest.raises(ValueError, match="id2label has 2 names but the model has 3 classes"):
        tiny_dit(id2label={0: "a", 1: "b"})


def test_cog_is_kept_by_saves_and_copies(tmp_path):
    model = DiTModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, num_layers=3, sample_size=8,
                     num_embeds_ada_norm=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    softmax_out = model.eval()(*inputs()).sample
    set_attention(model, "cog")  # after construction, as a user would: the record must still survive
    assert kinds(model) == ["softmax", "cog", "softmax"]
    out = model(*inputs()).sample
    assert not torch.allclose(out, softmax_out, atol=1e-4)  # Cog is really computed
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["uvit_cog_attention"]["kind"] == "cog"
    rebuilt = DiTModel.from_config(model.config)  # the EMA copy of the warning in uvit_cog.processors
    rebuilt.load_state_dict(model.state_dict())
    for other in (DiTModel.from_pretrained(tmp_path / "saved"), copy.deepcopy(model), rebuilt):
        assert kinds(other) == ["softmax", "cog", "softmax"]
        torch.testing.assert_close(other.eval()(*inputs()).sample, out)
    set_attention(model, "sigmoid", [0])  # declarative: replaces the first choice
    assert kinds(DiTModel.from_config(model.config)) == ["sigmoid", "softmax", "softmax"]
    set_attention(model, "cog", "none")
    assert "uvit_cog_attention" not in model.config and kinds(DiTModel.from_config(model.config)) == ["softmax"] * 3


def test_configs_written_before_first_last_had_one_meaning_build_the_same_models(tmp_path):
    """DiT's configs once named the blocks that GOT the kind, with "first_last" for every block but the first and
    the last: a DiTModel config.json of then (its set_attention record has no "format") and a saved run's model
    fields (`attention_layers`) still build U-ViC's placement, equal to today's `softmax_layers="first_last"`."""
    model = tiny_dit(attention_type="cog")
    assert kinds(model) == ["softmax", "cog", "softmax"]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["uvit_cog_attention"]["layers"] == "all_but_first_last"
    config["uvit_cog_attention"] = {"kind": "cog", "layers": "first_last", "note": "as written before"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for old in (DiTModel.from_pretrained(tmp_path), load_model(tmp_path)):
        assert kinds(old) == ["softmax", "cog", "softmax"]
        torch.testing.assert_close(old.eval()(*inputs()).sample, model(*inputs()).sample, rtol=0, atol=0)
    fields = dict(backbone="dit", preset=None, hidden_size=32, depth=5, num_heads=2, patch_size=2, sample_size=8,
                  in_channels=1, num_classes=3, learn_sigma=False, attention_type="cog")
    for then, now in (("first_last", "first_last"), ("all", "none"), ("none", "all"), ([1, 2], [0, 3, 4])):
        assert backbone_arguments({**fields, "attention_layers": then}) == backbone_arguments(
            {**fields, "softmax_layers": now})
    with pytest.raises(ValueError, match="both set"):
        backbone_arguments({**fields, "attention_layers": "all", "softmax_layers": "none"})


# ----------------------------------------------------------------------------------------------------------
# The pipeline on any DiT


def pipeline_of(transformer: torch.nn.Module) -> UViTPipeline:
    pipe = UViTPipeline(transformer, make_scheduler("ddim", scheduler_config("linear", "epsilon")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: UViTPipeline, **kwargs) -> np.ndarray:
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


def test_pipeline_samples_dit_with_learned_variance_from_its_eps_half():
    sigma = tiny_dit(learn_sigma=True, id2label={0: "cat", 1: "dog", 2: "bird"})
    assert sigma.config.out_channels == 2
    # The same model without the variance half: the rows of proj_out_2 that make ε, channel 0 of the 2 channels of
    # each (p, p, 2C) token (C = 1).
    eps = tiny_dit()
    state = sigma.state_dict()
    rows = [r for r in range(state["proj_out_2.weight"].shape[0]) if r % 2 == 0]
    for key in ("proj_out_2.weight", "proj_out_2.bias"):
        state[key] = state[key][rows]
    eps.load_state_dict(state)
    assert pipeline_of(sigma).get_label_ids(["bird", "cat"]) == [2, 0]
    for kwargs in (dict(class_labels=[0, 2], guidance_scale=2.0), dict()):  # CFG; the null label
        ours = sample(pipeline_of(sigma), **kwargs)
        np.testing.assert_allclose(ours, sample(pipeline_of(eps), **kwargs), atol=1e-5)
        # diffusers' own DiT, which has no None default for class_labels: the pipeline gives it the null label.
        np.testing.assert_allclose(ours, sample(pipeline_of(plain_dit(sigma)), **kwargs), atol=1e-5)
        assert ours.shape == (2, 8, 8, 1) and np.isfinite(ours).all()
    assert pipeline_of(plain_dit(sigma)).num_classes == 3


def test_pipeline_samples_an_unconditional_dit():
    pipe = pipeline_of(tiny_dit(num_classes=0))
    assert pipe.num_classes == 0 and np.isfinite(sample(pipe)).all()
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        pipe(num_inference_steps=2, guidance_scale=2.0)


# ----------------------------------------------------------------------------------------------------------
# train.py, sample.py, eval/score.py, compare.py, analyze.py


@pytest.fixture(scope="module")
def runs(mnist_npz, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 4-step runs of the tiny DiT-S/2 and its Cog twin on .npz digits (10 classes)."""
    root = tmp_path_factory.mktemp("dit_runs")
    return {model: train_script.train(train_config(*dit_overrides(mnist_npz, root / model, model)))
            for model in KINDS}


@pytest.mark.parametrize("model", KINDS)
def test_tiny_dit_trains_and_exports_a_pipeline(runs, model):
    run = runs[model]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run) if "loss" in r)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    index = json.loads((run / "pipeline" / "model_index.json").read_text())
    assert index["transformer"] == ["uvit_cog.dit", "DiTModel"]
    ema, raw = final_ema(run), final_model(run)
    assert ema.keys() == raw.keys() and not torch.equal(ema["proj_out_2.weight"], raw["proj_out_2.weight"])
    pipe = load_pipeline(run)
    assert type(pipe.transformer) is DiTModel and kinds(pipe.transformer) == KINDS[model]
    assert pipe.num_classes == 10 and pipe.transformer.config.out_channels == 1
    images = pipe(batch_size=2, class_labels=[3, 7], num_inference_steps=2, guidance_scale=1.5,
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    generic = DiffusionPipeline.from_pretrained(run / "pipeline", custom_pipeline=str(run / "pipeline"),
                                                trust_remote_code=True)
    assert kinds(generic.transformer) == KINDS[model]
    alone = load_model(run / "pipeline", subfolder="transformer")  # what set_attention's saved note points to
    assert type(alone) is DiTModel and kinds(alone) == KINDS[model]


def test_twins_differ_only_in_attention():
    for name in EXPERIMENTS:
        cog, base = train_config(f"experiment={name}_cog"), train_config(f"experiment={name}")
        assert cog.model.attention_type == "cog" and base.model.attention_type == "softmax"
        assert cog.model.softmax_layers == "first_last"
        cog.model.attention_type, cog.name = base.model.attention_type, base.name
        assert cog == base
    for size in ("s2", "b2", "l2", "xl2"):
        cog, base = train_config(f"model=dit_{size}_cog"), train_config(f"model=dit_{size}")
        assert (cog.model.attention_type, cog.model.preset) == ("cog", base.model.preset)


def test_dit_recipes_follow_dit():
    c = train_config("experiment=imagenet256_dit_xl2")
    assert (c.model.backbone, c.model.preset, c.model.num_classes, c.model.learn_sigma, c.data.kind,
            c.data.scale_factor, c.diffusion.schedule, c.diffusion.prediction_type) == (
        "dit", "dit-xl2", 1000, False, "latents", 0.18215, None, None)  # null: DDPM's linear schedule, ε
    assert (c.train.batch_size, c.optim.lr, c.optim.weight_decay, list(c.optim.betas), c.optim.warmup_steps,
            c.optim.lr_schedule, c.train.ema_decay, c.train.ema_warmup, c.train.condition_dropout, c.train.steps) == (
        256, 1e-4, 0.0, [0.9, 0.999], 0, "constant", 0.9999, False, 0.1, 400_000)
    assert (c.fid.guidance, c.fid.scheduler, c.fid.steps, c.sample.guidance) == (1.5, "ddpm", 250, 4.0)
    c = train_config("experiment=cifar10_dit_s2")
    u = train_config("experiment=cifar10_uvit_s2")  # beside U-ViT-S/2: the same data, budget and batch
    assert (c.data, c.train.steps, c.train.batch_size, c.train.ema_decay, c.model.num_classes) == (
        u.data, u.train.steps, u.train.batch_size, u.train.ema_decay, 0)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.lr_schedule, c.model.preset) == (1e-4, 0.0, "constant", "dit-s2")
    for name in EXPERIMENTS:
        with torch.device("meta"):
            model = train_script.build_model(train_config(f"experiment={name}"))
        assert type(model) is DiTModel
    assert num_parameters(model) == DIT_COUNTS["dit-xl2"] - 256 * 1152 - 16 * 1153  # ε output only


def test_resume_reproduces_the_uninterrupted_cog_run(runs, mnist_npz, tmp_path):
    run_dir = tmp_path / "resumed"
    train_script.train(train_config(*dit_overrides(mnist_npz, run_dir, "dit_s2_cog", "train.steps=2")))
    train_script.train(train_config(*dit_overrides(mnist_npz, run_dir, "dit_s2_cog")))  # resume=auto, to 4 steps
    assert_same_weights(final_model(run_dir), final_model(runs["dit_s2_cog"]), atol=1e-6)
    assert_same_weights(final_ema(run_dir), final_ema(runs["dit_s2_cog"]), atol=1e-6)
    assert kinds(load_pipeline(run_dir).transformer) == KINDS["dit_s2_cog"]
    with pytest.raises(ValueError, match=r"model.attention_type: 'cog' \(the run\) → 'softmax' \(now\)"):
        train_script.train(train_config(*dit_overrides(mnist_npz, run_dir, "dit_s2")))
    with pytest.raises(ValueError, match=r"model.backbone: 'dit' \(the run\) → 'uvit' \(now\)"):
        train_script.train(train_config("data=npz", f"data.path={mnist_npz}", "data.channels=1",
                                        "data.resolution=8", *TINY, f"run_dir={run_dir}"))


@pytest.mark.parametrize("overrides,match", [
    (["model.learn_sigma=true"], r"model.learn_sigma=true: DiT's learned variance is trained by its hybrid loss"),
    (["model.preset=dit-xxl2"], r"model.preset='dit-xxl2' is no dit size: choose one of \['dit-b2'"),
    (["model.backbone=unet"], r"model.backbone='unet': choose one of \['dit', 'uvit'\]"),
])
def test_config_errors_stop_before_training(mnist_npz, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_script.train(train_config(*dit_overrides(mnist_npz, tmp_path / "run", "dit_s2", *overrides)))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def reference_npz(mnist_npz, tmp_path_factory) -> Path:
    with np.load(mnist_npz) as data:
        path = tmp_path_factory.mktemp("ref") / "ref.npz"
        np.savez(path, arr_0=data["x_train"][:16])
    return path


@pytest.mark.parametrize("model", KINDS)
def test_sample_py_and_evaluate_py_accept_dit_runs(runs, model, reference_npz, tmp_path, monkeypatch):
    out = tmp_path / "grid.png"
    argv = ["sample.py", f"model={runs[model]}", "mode=grid", "scheduler=dpm_solver", "steps=2", "guidance=1.5",
            "grid_size=2", "classes=[1,2]", f"out={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    assert Image.open(out).size == (2 * 10 + 2, 2 * 10 + 2)  # 2 class rows of 2 images
    record_path = tmp_path / "metrics.json"
    argv = ["eval/score.py", f"input={runs[model]}", "num_samples=4", "scheduler=ddim", "steps=2",
            "guidance=1.5", "sample_batch_size=4", "metrics=[fid]", "weights=offline", "progress=false",
            f"reference={reference_npz}", f"out={record_path}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with threadpool_limits(1, user_api="blas"):  # FID's 2048x2048 eigendecomposition
        runpy.run_path(str(ROOT / "eval" / "score.py"), run_name="__main__")
    record = json.loads(record_path.read_text())
    assert record["input"]["kind"] == "model" and record["input"]["num_images"] == 4
    assert 0 < record["metrics"]["frechet_inception_distance"] < np.inf


def test_compare_micro_accepts_dit_experiments(tmp_path):
    """compare.py's micro preset on the CPU comparison's DiT, cut further: two steps, the validation loss only."""
    with np.load(DATA / "cifar10.npz") as data:  # 32 training and 10 test images of all classes: quick to load
        small = {f"{a}_{split}": data[f"{a}_{split}"][::step][:n] for a in "xy"
                 for split, step, n in (("train", 1563, 32), ("test", 1000, 10))}
    cifar = tmp_path / "cifar_small.npz"
    np.savez(cifar, **small)
    overrides = [f"data.path={cifar}", "model.hidden_size=32", "model.depth=3", "model.num_heads=2", "train.steps=2",
                 "train.batch_size=8", "log.every=1", "log.sample_every=0", "log.checkpoint_every=2", "fid.every=0",
                 "sample.grid_size=2", "sample.steps=2", "val.every=2", "val.num_images=8", "val.num_timesteps=2",
                 "val.batch_size=8"]
    out, quoted = tmp_path / "cmp", ",".join(f"'{o}'" for o in overrides)
    subprocess.run([sys.executable, "compare.py", "compare=micro", "compare.experiment=compare_cpu_dit",
                    f"compare.overrides=[{quoted}]", f"reference={cifar}", f"out_dir={out}"],
                   check=True, cwd=ROOT, capture_output=True)
    results = json.loads((out / "report.json").read_text())
    runs = results["runs"]
    assert runs["softmax"]["0"]["parameters"] == runs["cog"]["0"]["parameters"] > 0
    assert results["verdict_metric"] == "val" and math.isfinite(results["paired"]["val"]["cog"]["mean"])
    for name, expected in [("softmax", ["softmax"] * 3), ("cog", ["softmax", "cog", "softmax"])]:
        pipe = load_pipeline(out / f"{name}_seed0")
        assert type(pipe.transformer) is DiTModel and kinds(pipe.transformer) == expected


def test_analyze_py_refuses_dit_runs_clearly(runs, mnist_npz, tmp_path, monkeypatch):
    argv = ["analyze.py", f"models.uvit={runs['dit_s2_cog']}", "models.uvic=null", f"images={mnist_npz}",
            "split=train", "num_images=2", f"out_dir={tmp_path / 'analysis'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"models.uvit=.* is a DiTModel; attention weights are read from this "
                                         r"toolkit's own attention layers, which only UViTModel has"):
        runpy.run_path(str(ROOT / "analyze.py"), run_name="__main__")
