"""Text-to-image sampling and evaluation end to end on the CPU: sample.py with a prompt, a list and a prompts file,
FID sample sets prompted one image per prompt (resumable, refusing another prompt list), the MS-COCO FID protocol's
prompts and val2014 statistics from a tiny MS-COCO download, FID and the CLIP score in one record."""

import json
import runpy
import sys

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    load_sample_script,
    load_script,
    make_coco_fixture,
    sample_config,
    save_tiny_clip,
    tiny_t2i_pipeline,
)
from PIL import Image

from uvit_cog import load_pipeline
from uvit_cog.captions import coco_items, fid_prompts
from uvit_cog.metrics import load_statistics
from uvit_cog.sampling import generate_samples, sample_and_evaluate, with_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")
protocol = load_script("mscoco_fid_protocol")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny text-to-image pipeline directory (random weights: these tests check plumbing, not quality)."""
    path = tmp_path_factory.mktemp("t2i") / "pipe"
    tiny_t2i_pipeline().save_pretrained(path)
    return path


def run_sample(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")


def test_sample_py_grids_from_a_prompt_a_list_and_a_file(saved, tmp_path, monkeypatch):
    run_sample(monkeypatch, f"model={saved}", "prompt=a red bus", "steps=2", "grid_size=3", f"out={tmp_path / 'a.png'}")
    assert Image.open(tmp_path / "a.png").size == (3 * 10 + 2, 10 + 2)  # one row of 3
    run_sample(monkeypatch, f"model={saved}", "prompt=[a red bus,two cats]", "steps=2", "grid_size=2",
               f"out={tmp_path / 'b.png'}")
    assert Image.open(tmp_path / "b.png").size == (2 * 10 + 2, 2 * 10 + 2)  # a row per prompt
    (tmp_path / "p.txt").write_text("a kite\nthe sea\nan old teapot\n")
    run_sample(monkeypatch, f"model={saved}", f"prompts_file={tmp_path / 'p.txt'}", "steps=2", "grid_size=1",
               f"out={tmp_path / 'c.png'}")
    assert Image.open(tmp_path / "c.png").size == (10 + 2, 3 * 10 + 2)
    sample = load_sample_script()  # its checks, run before the model loads
    for args, message in [((), "is a text-to-image model: give prompt"),
                          (("prompt=x", f"prompts_file={tmp_path / 'p.txt'}"), "not both"),
                          (("classes=3", "prompt=x"), "give prompts instead"),
                          (("mode=fid", f"prompts_file={tmp_path / 'p.txt'}", "num_samples=5"), "give at least 5"),
                          ((f"prompts_file={tmp_path / 'none.txt'}",), "does not exist")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            sample.check_config(sample_config(f"model={saved}", "steps=2", *args))


def test_a_prompted_sample_set_resumes_and_refuses_another_prompt_list(saved, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a kite\nthe sea\nan old teapot\ntwo zebras\n")
    args = [f"model={saved}", "mode=fid", f"prompts_file={tmp_path / 'p.txt'}", "steps=2", f"out={tmp_path / 'set'}"]
    run_sample(monkeypatch, *args, "num_samples=2")
    first = [np.asarray(Image.open(tmp_path / "set" / f"00000{i}.png")) for i in range(2)]
    run_sample(monkeypatch, *args, "num_samples=4", "batch_size=3")  # grows the set, batch size aside
    assert [np.array_equal(np.asarray(Image.open(tmp_path / "set" / f"00000{i}.png")), first[i]) for i in range(2)] \
        == [True, True]
    record = json.loads((tmp_path / "set" / "sample_set.json").read_text())
    assert len(record["settings"]["prompts_sha256"]) == 64
    # Image 3 is "two zebras" whatever set it is drawn in: the same image from a pipeline call with that prompt.
    alone = with_scheduler(tiny_t2i_pipeline(), "dpm_solver")("two zebras", num_inference_steps=2, guidance_scale=1.0,
                                               output_type="np", generator=[torch.Generator().manual_seed(3)]).images[0]
    saved_image = np.asarray(Image.open(tmp_path / "set" / "000003.png")).astype(int)
    assert np.abs((alone * 255).round().astype(int) - saved_image).max() <= 1
    (tmp_path / "q.txt").write_text("other\nprompts\nhere\nnow\n")
    with pytest.raises(ValueError, match="prompts_sha256"):
        generate_samples(load_pipeline(saved), tmp_path / "set", 4, num_inference_steps=2, scheduler="dpm_solver",
                         prompts=(tmp_path / "q.txt").read_text().splitlines())


def test_the_fid_protocol_prompts_are_one_caption_each_of_distinct_images(tmp_path):
    coco = make_coco_fixture(tmp_path / "coco")
    items = coco_items(coco.root, "val2014")
    chosen = fid_prompts(items, 3, seed=0)
    assert len({item.path for item, _ in chosen}) == 3 and chosen == fid_prompts(items, 3, seed=0)
    assert fid_prompts(items, 3, seed=1) != chosen or len(items) == 3
    path = protocol.write_prompts(coco.root, tmp_path / "fid", num=3, seed=0)
    lines = path.read_text().splitlines()
    assert lines == [item.captions[k].strip() for item, k in chosen]
    meta = json.loads((tmp_path / "fid" / "prompts.json").read_text())
    assert [m["caption"] for m in meta] == [item.captions[k] for item, k in chosen]
    with pytest.raises(ValueError, match="num=9"):
        fid_prompts(items, 9)


def test_protocol_statistics_fid_and_clip_score_of_a_prompted_model(saved, tmp_path):
    """val2014 statistics at the pipeline's size, a prompted sample set scored against them: FID and CLIP score."""
    coco = make_coco_fixture(tmp_path / "coco")
    prompts = protocol.write_prompts(coco.root, tmp_path / "fid", num=4).read_text().splitlines()
    stats_path = protocol.write_statistics(coco.root, tmp_path / "fid", resolution=8, weights="offline",
                                           batch_size=4)
    stats = load_statistics(stats_path)
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)
    clip = save_tiny_clip(tmp_path / "clip")
    pipe = tiny_t2i_pipeline()
    record = sample_and_evaluate(pipe, 4, stats_path, metrics=("fid",), weights="offline", num_inference_steps=2,
                                 guidance_scale=2.0, batch_size=2, inception_batch_size=4, prompts=prompts,
                                 clip_model=clip, samples_dir=tmp_path / "set", progress=False)
    assert np.isfinite(record["metrics"]["frechet_inception_distance"])
    assert 0.0 <= record["metrics"]["clip_score"] <= 100.0 and record["clip_model"] == str(clip)
    assert record["sampler"]["prompts"] == 4
    with pytest.raises(ValueError, match="needs prompts"):
        generate_samples(pipe, tmp_path / "other", 2, num_inference_steps=2)
    with pytest.raises(ValueError, match="2 given for num_samples=3"):
        generate_samples(pipe, tmp_path / "other", 3, prompts=prompts[:2], num_inference_steps=2)
