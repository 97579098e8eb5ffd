"""Text-to-image training end to end on the CPU: feature extraction from a tiny MS-COCO download (and its resume),
training on the features (resume bit for bit, the validation loss on val2014, the exported pipeline), training on a
metadata.jsonl folder with on-the-fly encoding, the quick start's random text encoder, one caption per draw, and
caption dropout."""

import json

import numpy as np
import pytest
import torch
from conftest import (
    TINY,
    assert_same_weights,
    final_ema,
    load_script,
    make_captioned_folder,
    make_coco_fixture,
    save_tiny_clip,
    tiny_vae_dir,
    train_config,
    train_script,
)

from uvit_cog import UViTText2ImagePipeline, load_pipeline
from uvit_cog.conditioning import drop_condition
from uvit_cog.data import CaptionDraw, LabelCaptions, LatentDataset, build_dataset
from uvit_cog.rundir import read_metrics
from uvit_cog.text import encode_prompts, load_text_encoder
from uvit_cog.training import GlobalBatchRandom, prepare_batch

pytestmark = pytest.mark.usefixtures("single_thread")
extract = load_script("extract_latents")
TOKENS = 8  # text tokens per caption in these tests (CLIP's own 77 work the same, only slower)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny MS-COCO download, a tiny CLIP laid out as openai/clip-vit-large-patch14, a tiny VAE, and the
    latents + features of train2014 (shards of 2 images) and val2014."""
    root = tmp_path_factory.mktemp("t2i")
    coco = make_coco_fixture(root / "coco")
    clip, vae = save_tiny_clip(root / "clip"), tiny_vae_dir(root / "vae")
    kwargs = dict(vae=str(vae), resolution=16, shard_size=2, batch_size=3, num_loader_workers=0, device="cpu",
                  captions="coco", text_encoder=str(clip), num_text_tokens=TOKENS)
    train = extract.extract_latents(coco.root, root / "train", split="train2014", **kwargs)
    val = extract.extract_latents(coco.root, root / "val", split="val2014", **kwargs)
    return dict(coco=coco, clip=clip, vae=vae, train=train, val=val, kwargs=kwargs, root=root)


def test_extraction_stores_every_caption_its_features_and_the_empty_prompt(assets):
    data = LatentDataset(assets["train"])
    meta = data.meta
    assert meta["text_encoder"] == str(assets["clip"]) and meta["text_dim"] == 32 and meta["num_text_tokens"] == TOKENS
    assert meta["flip"] is False and meta["num_images"] == 6 and meta["num_shards"] == 3 and data.num_classes == 0
    expected = assets["coco"].items["train2014"]
    assert [data.captions(i) for i in range(len(data))] == [captions for _, captions in expected]
    encoder, tokenizer = load_text_encoder(assets["clip"])
    for i in (0, 5):
        k = data.num_captions(i) - 1
        features = encode_prompts(encoder, tokenizer, [expected[i][1][k]], TOKENS)[0]
        torch.testing.assert_close(data.caption_item(i, k)["encoder_hidden_states"], features)
        assert data.caption_item(i, k)["x"].shape == (8, 8, 8)  # mean and log-variance of 4 latent channels
    torch.testing.assert_close(data.empty_text_features(), encode_prompts(encoder, tokenizer, [""], TOKENS)[0])


def test_extraction_resumes_a_killed_run_and_refuses_another_job(assets, tmp_path):
    out = tmp_path / "train"
    extract.extract_latents(assets["coco"].root, out, split="train2014", **assets["kwargs"])
    done = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    (out / "shard_00002.labels.npy").unlink()  # as if killed before the last shard was marked done
    (out / "shard_00002.text.npy").write_bytes(b"torn")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_00000.*")}
    extract.extract_latents(assets["coco"].root, out, split="train2014", **assets["kwargs"])
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == done
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_00000.*")} == stamps  # finished shards skipped
    with pytest.raises(ValueError, match="holds latents of another extraction"):
        other = {**assets["kwargs"], "num_text_tokens": 6}
        extract.extract_latents(assets["coco"].root, out, split="train2014", **other)


def coco_overrides(assets, run_dir, *extra):
    return ["experiment=mscoco_uvic_s2", f"data.root={assets['train']}", f"data.val_root={assets['val']}",
            "data.resolution=8", f"data.num_text_tokens={TOKENS}", "data.text_dim=32", "data.num_workers=0",
            *TINY, "train.mixed_precision=no", "val.every=2", "val.num_images=2", "val.batch_size=2",
            "sample.grid_size=2", "sample.scheduler=ddim", f"run_dir={run_dir}", *extra]


def test_training_on_features_resumes_exactly_and_exports_a_text_to_image_pipeline(assets, tmp_path):
    whole = train_script.train(train_config(*coco_overrides(assets, tmp_path / "whole")))
    parted = tmp_path / "parted"
    train_script.train(train_config(*coco_overrides(assets, parted, "train.steps=2")))
    train_script.train(train_config(*coco_overrides(assets, parted)))  # resume=auto: steps 3-4
    assert_same_weights(final_ema(parted), final_ema(whole))
    records = read_metrics(whole)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(np.isfinite(r["val_loss"]) for r in val)
    assert (whole / "samples" / "step_0000004.png").is_file()
    pipe = load_pipeline(whole)
    assert isinstance(pipe, UViTText2ImagePipeline)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.23010)  # U-ViT's factor, not the VAE config's
    assert pipe.transformer.config.timestep_offset == 1 and pipe.transformer.attention_types[1] == "cog"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red bus on a street", "two cats"], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_features_of_another_encoder_or_width_are_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="holds text features of .* but data.text_encoder=other/clip"):
        train_script.train(train_config(*coco_overrides(assets, tmp_path / "a", "data.text_encoder=other/clip")))
    with pytest.raises(ValueError, match=r"has text_dim 32 but the config says 768: set data.text_dim=32"):
        train_script.train(train_config(*coco_overrides(assets, tmp_path / "b", "data.text_dim=768")))


def test_training_on_a_captioned_folder_encodes_on_the_fly(assets, tmp_path):
    folder = make_captioned_folder(tmp_path / "folder")
    overrides = ["data=captions", "data.format=folder", f"data.root={folder.root}", "data.resolution=8",
                 f"data.text_encoder={assets['clip']}", "data.text_dim=32", f"data.num_text_tokens={TOKENS}",
                 "data.num_workers=0", "data.holdout=2", *TINY, "train.condition_dropout=0.1", "val.every=2",
                 "val.num_images=2", f"run_dir={tmp_path / 'run'}", "sample.prompts=[a kite,two horses]"]
    run_dir = train_script.train(train_config(*overrides))
    assert any("val_loss" in r for r in read_metrics(run_dir))
    pipe = load_pipeline(run_dir)
    assert isinstance(pipe, UViTText2ImagePipeline) and pipe.vae is None
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_quick_start_keeps_its_random_text_encoder_in_the_run(tmp_path):
    overrides = ["experiment=quickstart_t2i", *TINY, "train.steps=2", "log.checkpoint_every=1", "val.every=0",
                 "data.max_images=64", f"run_dir={tmp_path / 'qs'}"]
    run_dir = train_script.train(train_config(*overrides))
    saved = run_dir / "text_encoder"
    assert (saved / "text_encoder" / "config.json").is_file() and (saved / "tokenizer").is_dir()
    exported, _ = load_text_encoder(run_dir / "pipeline", subfolder="text_encoder")
    kept, _ = load_text_encoder(saved, subfolder="text_encoder")
    assert_same_weights(exported.state_dict(), kept.state_dict())
    grid = run_dir / "samples" / "step_0000002.png"
    assert grid.is_file()
    config = json.loads((run_dir / "pipeline" / "transformer" / "config.json").read_text())
    assert config["text_dim"] == 64 and config["num_text_tokens"] == 8
    tokenizer = load_text_encoder(run_dir / "pipeline", subfolder="text_encoder")[1]
    words = ["seven", "written", "by", "hand"]  # the captions' words: one token each
    assert tokenizer.tokenize("seven written by hand") == [w + "</w>" for w in words]


def test_one_caption_per_draw_is_seeded_by_the_stream_position():
    digits = build_dataset(dict(kind="digits", resolution=8, channels=1, num_classes=0, caption_templates=[
        "a {}", "the digit {}"], caption_names=[[str(d)] for d in range(10)]))
    assert isinstance(digits, LabelCaptions) and digits.num_captions(0) == 2
    draw = CaptionDraw(digits, seed=0)
    first = [draw[(3, p)]["caption"] for p in range(40)]
    assert first == [draw[(3, p)]["caption"] for p in range(40)]  # the same position, the same caption
    assert set(first) == set(digits.captions(3))  # every caption is drawn
    other = [CaptionDraw(digits, seed=1)[(3, p)]["caption"] for p in range(40)]
    assert other != first
    torch.testing.assert_close(draw[(3, 0)]["x"], digits.dataset[3]["x"])


def test_caption_dropout_swaps_in_the_null_features():
    features = torch.randn(64, 4, 5)
    null = {"encoder_hidden_states": torch.full((1, 4, 5), 7.0)}
    batch = {"x": torch.zeros(64, 3, 2, 2), "encoder_hidden_states": features}
    rnd = lambda: GlobalBatchRandom(0, 3, 0, 64, 64, torch.device("cpu"))  # noqa: E731
    x, condition = prepare_batch(batch, rnd(), "text", dropout=0.5, null=null)
    dropped = (condition["encoder_hidden_states"] == 7.0).all(dim=(1, 2))
    assert 10 < int(dropped.sum()) < 54  # about half, drawn from the step's generator
    torch.testing.assert_close(condition["encoder_hidden_states"][~dropped], features[~dropped])
    _, again = prepare_batch(batch, rnd(), "text", dropout=0.5, null=null)
    assert torch.equal(again["encoder_hidden_states"], condition["encoder_hidden_states"])
    keep = drop_condition({"encoder_hidden_states": features}, torch.zeros(64, dtype=torch.bool), null)
    assert torch.equal(keep["encoder_hidden_states"], features)


def test_a_metadata_jsonl_folder_extracts_with_every_caption(assets, tmp_path):
    folder = make_captioned_folder(tmp_path / "folder")
    out = extract.extract_latents(folder.root, tmp_path / "latents", **{**assets["kwargs"], "captions": "folder"})
    data = LatentDataset(out)
    assert data.has_text and data.meta["captions"] == "folder" and data.meta["split"] is None
    assert [data.captions(i) for i in range(len(data))] == [captions for _, captions in folder.items]


@pytest.mark.parametrize("name,count,cog", [("mscoco_uvit_s2", 44_692_644, False),
                                            ("mscoco_uvit_s2_deep", 58_345_636, False),
                                            ("mscoco_uvic_s2", 44_692_644, True)])
def test_mscoco_recipes_build_the_official_models(name, count, cog):
    cfg = train_config(f"experiment={name}", "data.root=/data/coco256_train")
    with torch.device("meta"):
        model = train_script.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.config.text_dim == 768 and model.config.num_text_tokens == 77 and model.config.timestep_offset == 1
    kinds = model.attention_types
    assert (kinds[0], kinds[-1]) == ("softmax", "softmax") and set(kinds[1:-1]) == ({"cog"} if cog else {"softmax"})
    t, o = cfg.train, cfg.optim
    assert (t.batch_size, t.ema_decay, t.condition_dropout, t.mixed_precision) == (256, 0.9999, 0.1, "fp16")
    assert (o.lr, o.weight_decay, list(o.betas), o.warmup_steps) == (2e-4, 0.03, [0.9, 0.9], 5000)
    assert (cfg.data.scale_factor, cfg.diffusion.schedule, cfg.sample.guidance) == (0.2301, "scaled_linear", 2.0)
