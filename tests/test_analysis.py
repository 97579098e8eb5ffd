"""Attention analysis on a tiny model: statistics in range, sign structure, collapse probe and PNG maps."""

import torch
from diffusers import DDPMScheduler
from PIL import Image

from uvit_cog import UViTModel
from uvit_cog.analysis import (
    attention_statistics,
    collapse_probe,
    effective_rank,
    mean_pairwise_cosine,
    noisy_inputs,
    render_attention_maps,
    summarise_by_block,
    token_groups,
)
from uvit_cog.objectives import make_objective
from uvit_cog.schedule import flow_scheduler_config, scheduler_config


def _setup(**kwargs):
    torch.manual_seed(0)
    model = UViTModel(sample_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=4, num_heads=2, **kwargs)
    with torch.no_grad():  # qkv scaled up so that scores are of order one, as in a trained model
        for b in model.blocks:
            b.attn.qkv.weight.mul_(20)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    return model, x0, make_objective(scheduler_config())


def test_attention_statistics_sign_structure():
    model, x0, sched = _setup()
    rows = attention_statistics(model, x0, [100, 900], sched)
    assert len(rows) == 2 * 5 * 2  # timesteps x blocks x heads
    for r in rows:
        assert 0.0 <= r["negative_fraction"] <= 1.0 and 0.0 <= r["negative_mass"] <= 1.0
        if r["attention_type"] == "softmax":
            assert r["negative_fraction"] == 0.0 and r["negative_mass"] == 0.0
    cog = [r for r in rows if r["attention_type"] == "cog"]
    assert {r["block"] for r in cog} == {1, 2, 3}
    assert all(r["negative_fraction"] > 0.05 and r["negative_mass"] > 0.01 for r in cog)
    per_block = summarise_by_block(rows, "negative_fraction")
    assert [r["block"] for r in per_block] == [0, 1, 2, 3, 4]


def test_statistics_of_every_kind():
    """Each kind's statistic says what its formula implies: softmax rows sum to 1 with no negative weight,
    softpick is sparse, softmax1 leaves mass to its sink, cog and diff weights go negative."""
    kinds = ["softmax", "softpick", "softmax1", "cog", "diff"]
    model, x0, sched = _setup(attention_layers={kind: [i] for i, kind in enumerate(kinds)})
    rows = attention_statistics(model, x0, [300], sched)
    by_kind = {kind: [r for r in rows if r["attention_type"] == kind] for kind in kinds}
    assert len(by_kind["diff"]) == 1 and all(len(by_kind[k]) == 2 for k in kinds[:4])  # diff pairs the 2 heads
    for r in by_kind["softmax"]:
        assert r["negative_fraction"] == 0 and abs(r["row_sum"] - 1) < 1e-5 and r["sink_mass"] is None
    assert all(r["sparsity"] > 0.05 and r["negative_fraction"] == 0 for r in by_kind["softpick"])
    for r in by_kind["softmax1"]:
        assert 0.0 < r["sink_mass"] < 1.0 and abs(r["row_sum"] + r["sink_mass"] - 1) < 1e-6
    assert all(r["negative_fraction"] > 0.05 and 0 < r["negative_mass"] < 1 for r in by_kind["cog"] + by_kind["diff"])
    summary = summarise_by_block(rows, "sink_mass")
    assert summary[0]["sink_mass"] is None and summary[2]["sink_mass"] > 0


def test_collapse_probe_measures():
    identical = torch.ones(2, 5, 4)
    assert torch.allclose(mean_pairwise_cosine(identical), torch.ones(2))
    assert torch.allclose(effective_rank(identical), torch.ones(2), atol=1e-4)
    orthogonal = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(mean_pairwise_cosine(orthogonal), torch.zeros(2))
    assert torch.allclose(effective_rank(orthogonal), torch.full((2,), 4.0))
    model, x0, sched = _setup()
    rows = collapse_probe(model, x0, [500], sched)
    assert [r["block"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(-1 <= r["cosine_similarity"] <= 1 and 1 <= r["effective_rank"] <= 17 for r in rows)


def test_render_attention_maps_writes_png(tmp_path):
    model, x0, sched = _setup()
    path = render_attention_maps(model, x0, 500, sched, tmp_path / "maps.png", query_tokens=[0, 5], blocks=[0, 2])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_analyze_command_side_by_side(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from uvit_cog.pipeline import UViTPipeline

    model, _, _ = _setup()
    sched = DDPMScheduler.from_config(scheduler_config())
    UViTPipeline(transformer=model, scheduler=sched).save_pretrained(tmp_path / "uvic")
    softmax = UViTModel(**{**model.config, "attention_type": "softmax"})
    UViTPipeline(transformer=softmax, scheduler=sched).save_pretrained(tmp_path / "uvit")
    sink = UViTModel(**{**model.config, "attention_type": "softmax1_sink"})
    UViTPipeline(transformer=sink, scheduler=sched).save_pretrained(tmp_path / "sink")
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x_test=images)
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "analyze.py"), f"models.uvit={tmp_path / 'uvit'}",
         f"models.uvic={tmp_path / 'uvic'}", f"+models.sink={tmp_path / 'sink'}", f"images={tmp_path / 'imgs.npz'}",
         "num_images=3",
         "timesteps=[200]", f"out_dir={tmp_path / 'out'}"],
        check=True, capture_output=True, cwd=root,
    )
    report = (tmp_path / "out" / "analysis.md").read_text()
    assert "| block | uvit | uvic | sink |" in report and "(cog)" in report and "(softmax1_sink)" in report
    sink_table = report.split("## Mass the sink takes")[1].split("##")[0]
    assert "– (softmax)" in sink_table and "– (cog)" in sink_table and "(softmax1_sink)" in sink_table
    assert (tmp_path / "out" / "maps_uvit.png").is_file() and (tmp_path / "out" / "maps_uvic.png").is_file()


def test_noisy_inputs_follow_the_models_objective():
    """analyze.py noises images the way the model was trained: DDPM's schedule, or the flow interpolant at
    t = timestep / T for a flow model (which sees t·T)."""
    x0 = torch.randn(2, 3, 8, 8)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    flow = make_objective(flow_scheduler_config())
    torch.testing.assert_close(noisy_inputs(x0, 250, flow, seed=3), 0.75 * x0 + 0.25 * noise)
    ddpm = DDPMScheduler.from_config(scheduler_config())
    expected = ddpm.add_noise(x0, noise, torch.full((2,), 250, dtype=torch.long))
    torch.testing.assert_close(noisy_inputs(x0, 250, make_objective(scheduler_config()), seed=3), expected)


def test_token_groups_follow_each_condition():
    none, _, _ = _setup()
    assert token_groups(none) == {"time": slice(0, 1), "image": slice(1, None)}
    labelled, _, _ = _setup(num_classes=3)
    assert token_groups(labelled) == {"label": slice(0, 1), "time": slice(1, 2), "image": slice(2, None)}
    text, _, _ = _setup(text_dim=6, num_text_tokens=5)
    assert token_groups(text) == {"time": slice(0, 1), "text": slice(1, 6), "image": slice(6, None)}


def test_group_statistics_split_the_image_rows_mass_by_token_group():
    model, x0, sched = _setup(text_dim=6, num_text_tokens=5, attention_type="cog")
    condition = {"encoder_hidden_states": torch.randn(3, 5, 6)}
    rows = attention_statistics(model, x0, [300], sched, condition)
    for row in rows:
        total = sum(row[f"image->{g} mass"] for g in ("time", "text", "image"))
        assert abs(total - 1.0) < 1e-5  # the groups cover every key
        if row["attention_type"] == "softmax":
            assert row["image->text negative mass"] == 0.0
    cog_rows = [r for r in rows if r["attention_type"] == "cog"]
    assert any(r["image->text negative mass"] > 0 for r in cog_rows)  # Cog can push text tokens away


def test_analyze_py_splits_text_models_by_token_group(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from conftest import tiny_t2i_pipeline

    for name, kind in (("uvit", "softmax"), ("uvic", "cog")):
        pipe = tiny_t2i_pipeline(attention_type=kind)
        with torch.no_grad():
            for b in pipe.transformer.blocks:
                b.attn.qkv.weight.mul_(20)
        pipe.save_pretrained(tmp_path / name)
    np.savez(tmp_path / "imgs.npz", x_test=np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "prompts.txt").write_text("a red bus\ntwo cats\n")
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "analyze.py"), f"models.uvit={tmp_path / 'uvit'}",
            f"models.uvic={tmp_path / 'uvic'}", f"images={tmp_path / 'imgs.npz'}", "num_images=2", "timesteps=[200]",
            "map_timestep=200", f"out_dir={tmp_path / 'out'}"]
    refused = subprocess.run(args, capture_output=True, text=True, cwd=root)
    assert refused.returncode != 0 and "give prompts_file" in refused.stderr + refused.stdout
    subprocess.run([*args, f"prompts_file={tmp_path / 'prompts.txt'}"], check=True, capture_output=True, cwd=root)
    report = (tmp_path / "out" / "analysis.md").read_text()
    table = report.split("## Share of the image tokens' |w| on negative weights of the text token(s)")[1].split("##")[0]
    assert "| block | uvit | uvic |" in table and "0.000 (softmax)" in table and "(cog)" in table
