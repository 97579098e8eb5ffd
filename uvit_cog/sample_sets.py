"""The sample-set format on disk: numbered PNGs (`000000.png`, ...) and/or an ADM-style `samples.npz`, and the
record of where the images came from (`sample_set.json`).

A set records its model (`uvit_cog.provenance.model_sha256` of the transformer, VAE and, for text-to-image, the
text encoder and tokenizer, as sampled: dtype included) with its source path, and every setting an image depends on
(seed, steps, guidance, class ids or the prompt list's digest, the scheduler's class and config). Adding to a set
from another model or with other settings is refused naming every difference, and a folder whose numbered images
carry no record is neither extended nor scored: a set is one model's, or it is refused. Writing the set is
`uvit_cog.sampling.generate_samples`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .pipeline import UViTPipelineBase
from .provenance import as_json, describe_differences, differences, model_sha256
from .rundir import TMP_PREFIX, atomic_write

NPZ_NAME = "samples.npz"
PARTS_DIR = ".parts"  # PNG store of an .npz-only sample set, removed once the .npz is written
SET_RECORD = "sample_set.json"  # where a sample set came from: `sample_set_record`
SET_FORMAT = 1
SET_MEMBER = re.compile(r"\d{6}\.png")  # the images of a set: png_path's names


def save_png_atomic(image: np.ndarray, path: Path) -> None:
    """Write a uint8 HWC image as PNG through `rundir.atomic_write`, so an interruption leaves no truncated file.

    Not fsynced: a killed process still leaves whole files only, and an fsync per image would cut the
    writing rate ~10x (measured 3,000 -> 260 PNGs/s for 32x32 images on this project's disk)."""
    with atomic_write(path, fsync=False) as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")


def png_path(folder: Path, index: int) -> Path:
    """The file of sample `index`: `000123.png`."""
    return folder / f"{index:06d}.png"


def pack_npz(png_dir: Path, num_samples: int, path: Path) -> None:
    """Pack PNGs 0..num_samples-1 into an ADM-style `.npz` (`arr_0`, uint8 NHWC, RGB), atomically."""
    arr = np.stack([np.asarray(Image.open(png_path(png_dir, i)).convert("RGB")) for i in range(num_samples)])
    with atomic_write(path) as f:
        np.savez(f, arr_0=arr)


def remove_partial_writes(folder: Path) -> None:
    """Delete what interrupted writes of sample PNGs and of the `.npz` left: `rundir.atomic_write`'s
    `.tmp_NNNNNN.png.<pid>` / `.tmp_samples.npz.<pid>` files and the `NNNNNN.png.tmp` / `samples.npz.tmp`
    files of earlier versions of this module. Every process may call it before any writes (unlinking twice
    is harmless)."""
    for pattern in (f"{TMP_PREFIX}*.png.*", "*.png.tmp", f"{TMP_PREFIX}{NPZ_NAME}.*", f"{NPZ_NAME}.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def sample_set_record(pipeline: UViTPipelineBase, seed: int, num_inference_steps: int, guidance_scale: float,
                      class_ids: Sequence[int], prompts: Sequence[str] | None = None) -> dict:
    """What a sample set's images depend on, as JSON: the model (`model_sha256` of the transformer, the VAE and a
    text-to-image model's text encoder and tokenizer, and the path it was loaded from, for people) and the
    settings (seed, steps, guidance, the class ids labels are drawn from or the SHA-256 of the prompt list, the
    scheduler's class and config without diffusers' bookkeeping keys). `pipeline` samples with the scheduler of
    the set (`with_scheduler`). The batch size and the image count are not in it: an image does not depend on
    them, and a set may grow (with the same prompt list)."""
    config = {k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")}
    parts = [pipeline.components.get(name) for name in ("transformer", "vae", "text_encoder", "tokenizer")]
    settings = {"seed": seed, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                "class_ids": list(class_ids) or None,
                "scheduler": {"class": type(pipeline.scheduler).__name__, "config": config}}
    if prompts is not None:
        settings["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return as_json({
        "format": SET_FORMAT,
        "model": {"sha256": model_sha256(*parts), "source": getattr(pipeline, "name_or_path", None)},
        "settings": settings,
    })


def set_members(out_dir: Path) -> list[Path]:
    """The images of the sample set in `out_dir`: numbered PNGs (also in its `.parts` store) and `samples.npz`."""
    found = [p for folder in (out_dir, out_dir / PARTS_DIR) if folder.is_dir()
             for p in sorted(folder.iterdir()) if SET_MEMBER.fullmatch(p.name)]
    return found + ([out_dir / NPZ_NAME] if (out_dir / NPZ_NAME).is_file() else [])


def check_sample_set(out_dir: Path, record: dict) -> None:
    """Refuse to add to the set in `out_dir` unless its images came from the model and settings of `record`.

    A folder without images takes any set (a start that failed before its first image blocks nothing). Images
    without a record (another tool, another model, or a set written before sets had records) are refused: their
    model is unknown, and resuming or scoring them as this model's would mix models silently.
    """
    members = set_members(out_dir)
    if not members:
        return
    path = out_dir / SET_RECORD
    if not path.is_file():
        raise ValueError(
            f"{out_dir} holds {len(members)} sample image(s) ({members[0].name}, ...) but no {SET_RECORD}: their "
            "model and settings are unknown, so they are neither extended nor scored as this model's. Give another "
            "output folder, or move those images away"
        )
    saved = json.loads(path.read_text())
    diffs = differences({"model": saved.get("model", {}).get("sha256"), **saved.get("settings", {})},
                        {"model": record["model"]["sha256"], **record["settings"]}, strict=True)
    if diffs:
        what = "another model" if "model" in diffs else "other settings"
        source = saved.get("model", {}).get("source") or "a pipeline built in memory"
        raise ValueError(
            f"{out_dir} is a sample set of {what} ({len(members)} image(s); model from {source}): adding images "
            f"would mix two sets:\n{describe_differences(diffs, 'the set', 'now')}\nGive another output folder, or "
            "delete this one to start the set over"
        )


def sample_set_files(out_dir: str | os.PathLike, num_samples: int) -> list[Path]:
    """The PNGs of images 0 .. num_samples-1 of a sample set written with PNGs: what a score of the set reads,
    and nothing else the folder may hold."""
    return [png_path(Path(out_dir), i) for i in range(num_samples)]


__all__ = ["NPZ_NAME", "PARTS_DIR", "SET_FORMAT", "SET_MEMBER", "SET_RECORD", "check_sample_set", "pack_npz",
           "png_path", "remove_partial_writes", "sample_set_files", "sample_set_record", "save_png_atomic",
           "set_members"]
