"""scripts/digit_prompt_accuracy.py: the quick starts' measure of whether a sample shows the digit asked for."""

import json
import runpy
import sys

import numpy as np
import pytest
from conftest import ROOT, load_script, tiny_pipeline, tiny_t2i_pipeline
from omegaconf import OmegaConf

from uvit_cog.data import ArrayDataset, load_digits_arrays

accuracy = load_script("digit_prompt_accuracy")


def test_the_classifier_reads_held_out_digits_as_the_quick_starts_train_on_them():
    classifier, ceiling = accuracy.fit_digit_classifier()
    images, labels = load_digits_arrays()
    data = ArrayDataset(images, labels, resolution=16)  # the quick starts' 16x16 images in [-1, 1]
    held_out = np.arange(1400, len(images))
    x = np.stack([(data[i]["x"][0].numpy() + 1) / 2 for i in held_out])
    read = accuracy.read_digits(classifier, x)
    assert ceiling > 0.85
    assert (read == labels[held_out]).mean() > 0.85
    with pytest.raises(ValueError, match="8·k pixels"):
        accuracy.read_digits(classifier, x[:, :12, :12])


def run_script(monkeypatch, capsys, run, *args: str) -> tuple[list[str], dict]:
    monkeypatch.setattr(sys, "argv", ["digit_prompt_accuracy.py", str(run), *args])
    runpy.run_path(str(ROOT / "scripts" / "digit_prompt_accuracy.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[:-2], json.loads(lines[-1])


def test_every_caption_of_a_text_run_is_measured(tmp_path, monkeypatch, capsys):
    tiny_t2i_pipeline().save_pretrained(tmp_path / "pipeline")
    names = [[str(d), f"n{d}"] for d in range(10)]
    OmegaConf.save({"data": {"caption_templates": ["{}", "the digit {}"], "caption_names": names}},
                   tmp_path / "config.yaml")
    assert accuracy.conditions(tmp_path, text=True)[:3] == [("0", 0), ("n0", 0), ("1", 1)]
    rows, summary = run_script(monkeypatch, capsys, tmp_path, "--per-prompt", "2", "--steps", "2")
    assert len(rows) == 40 and rows[-1].endswith("'the digit n9'")
    assert 0 <= summary["accuracy"] <= 1 and summary["per_prompt"] == 2


def test_a_class_run_is_measured_per_class_and_a_bad_run_is_refused(tmp_path, monkeypatch, capsys):
    tiny_pipeline(num_classes=10).save_pretrained(tmp_path / "pipeline")
    OmegaConf.save({"data": {}}, tmp_path / "config.yaml")
    rows, summary = run_script(monkeypatch, capsys, tmp_path, "--per-prompt", "1", "--steps", "2")
    assert len(rows) == 10 and 0 <= summary["accuracy"] <= 1
    with pytest.raises(SystemExit):
        run_script(monkeypatch, capsys, tmp_path / "missing")
    assert "not a finished run directory" in capsys.readouterr().err
