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
    render_attention_maps,
    summarise_by_block,
)
from uvit_cog.schedule import scheduler_config


def _setup():
    torch.manual_seed(0)
    model = UViTModel(sample_size=8, patch_size=2, in_channels=3, embed_dim=32, depth=4, num_heads=2)
    with torch.no_grad():  # qkv scaled up so that scores are of order one, as in a trained model
        for b in model.blocks:
            b.attn.qkv.weight.mul_(20)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    return model, x0, DDPMScheduler.from_config(scheduler_config())


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

    model, _, sched = _setup()
    UViTPipeline(transformer=model, scheduler=sched).save_pretrained(tmp_path / "uvic")
    softmax = UViTModel(**{**model.config, "attention_type": "softmax"})
    UViTPipeline(transformer=softmax, scheduler=sched).save_pretrained(tmp_path / "uvit")
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x_test=images)
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "analyze.py"), f"models.uvit={tmp_path / 'uvit'}",
         f"models.uvic={tmp_path / 'uvic'}", f"images={tmp_path / 'imgs.npz'}", "num_images=3",
         "timesteps=[200]", f"out_dir={tmp_path / 'out'}"],
        check=True, capture_output=True, cwd=root,
    )
    report = (tmp_path / "out" / "analysis.md").read_text()
    assert "| block | uvit | uvic |" in report and "(cog)" in report
    assert (tmp_path / "out" / "maps_uvit.png").is_file() and (tmp_path / "out" / "maps_uvic.png").is_file()
