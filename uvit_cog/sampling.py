"""Image grids and FID sample sets from a pipeline (classes or prompts), shared by `sample.py`, training and evaluation;
`sample_and_evaluate` generates a sample set and scores it with `uvit_cog.metrics`.

Every image has an index and its own generator, seeded `seed + index` (CPU, so results do not depend
on the device's RNG). A sample-set image first draws its class label from that generator, then its
initial noise; a grid image's label is its row's class. An image therefore does not depend on the
batch it was generated in, on the process count, or on resuming. This is exact for deterministic
samplers and for the stochastic ones whose `step` takes a generator (DDPM, DDIM, Euler-a, SDE
DPM-Solver), which then draw each image's step noise from its own generator; a sampler that draws step
noise otherwise (e.g. a Brownian tree) is deterministic per seed only for a fixed batch composition.
Floating-point results of a batched forward can still differ in the last bits between batch sizes.

A sample set (`generate_samples`) records where its images came from (`uvit_cog.sample_sets`: the format on disk,
the record, the refusal to mix models or settings). A text-to-image model's image i is prompted by prompt i.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .checks import SEED, check_output_file
from .clip_score import ClipScorer
from .images import ImageFiles, png_is_complete
from .inception import InceptionWeights, resolve_weights
from .metrics import METRICS, Statistics, check_metric_names, compute_metrics, load_reference, statistics_path
from .pipeline import ClassLabel, UViTPipeline, UViTPipelineBase, UViTText2ImagePipeline, with_components
from .rundir import write_text_atomic
from .sample_sets import (
    NPZ_NAME,
    PARTS_DIR,
    SET_RECORD,
    check_sample_set,
    pack_npz,
    png_path,
    remove_partial_writes,
    sample_set_files,
    sample_set_record,
    save_png_atomic,
)
from .schedule import make_scheduler


def index_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index`: a CPU generator seeded `seed + index`."""
    return torch.Generator("cpu").manual_seed(int(seed) + int(index))


def with_scheduler(pipeline: UViTPipelineBase, scheduler: str | SchedulerMixin | None) -> UViTPipelineBase:
    """`pipeline` sampling with another scheduler (a `SCHEDULERS` name built on its noise schedule, or an
    instance); the components are shared, the given pipeline is left unchanged. A scheduler of the other
    objective's family is refused here, before any sampling."""
    if scheduler is None:
        return pipeline
    if isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    swapped = with_components(pipeline, scheduler=scheduler)  # the model's objective, not the new scheduler's
    swapped.check_scheduler()
    return swapped


def generate_images(
    pipeline: UViTPipelineBase,
    generators: list[torch.Generator],
    conditions: list[int] | list[str] | None,
    num_inference_steps: int,
    guidance_scale: float,
) -> np.ndarray:
    """One pipeline call, one image per generator: uint8 (N, H, W, C). `conditions` holds each image's class id
    (`UViTPipeline`; None: unconditional) or prompt (`UViTText2ImagePipeline`)."""
    if isinstance(pipeline, UViTText2ImagePipeline):
        inputs = {"prompt": conditions}
    else:
        inputs = {"batch_size": len(generators), "class_labels": conditions}
    images = pipeline(**inputs, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generators, output_type="np").images
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def make_grid_image(images: Sequence[Image.Image] | np.ndarray, nrow: int, padding: int = 2) -> Image.Image:
    """Tile images (PIL images or uint8 NHWC) into one image, `nrow` images per row (torchvision's meaning)."""
    arr = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if arr.ndim == 3:
        arr = arr[..., None]
    if len(arr) == 0 or nrow <= 0:
        raise ValueError(f"make_grid_image needs at least one image and nrow >= 1, got {len(arr)} and {nrow}")
    n, h, w, c = arr.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k, image in enumerate(arr):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def grid_classes(pipeline: UViTPipeline, n: int, class_labels: Sequence[ClassLabel] | None = None) -> list[int] | None:
    """The class of each grid row: the ones asked for, else `n` classes evenly spaced over all (all if fewer).

    None for an unconditional model.
    """
    if class_labels is not None:
        return pipeline.get_label_ids(class_labels)
    if pipeline.num_classes == 0:
        return None
    return sorted({int(round(c)) for c in np.linspace(0, pipeline.num_classes - 1, min(n, pipeline.num_classes))})


def sample_grid(
    pipeline: UViTPipelineBase,
    n: int = 8,
    class_labels: Sequence[ClassLabel] | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    scheduler: str | SchedulerMixin | None = None,
    batch_size: int = 64,
    prompts: Sequence[str] | None = None,
) -> Image.Image:
    """A grid with `n` images per row and fixed seeds: one row per prompt for a text-to-image model, one row per
    class for a class-conditional one (`grid_classes`), `n` rows for an unconditional one. Image k (row-major)
    uses generator `seed + k`."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"grid size n must be a positive int, got {n!r}")
    SEED("seed", seed)
    if isinstance(pipeline, UViTText2ImagePipeline):
        if not prompts:
            raise ValueError("a text-to-image model's grid needs prompts (one row each)")
        pipeline.check_inputs(list(prompts), None, None, None, None, None, num_inference_steps, guidance_scale)
        rows = list(prompts)
    else:
        if prompts:
            raise ValueError("prompts given for a model that is not text-conditional; give class_labels")
        rows = grid_classes(pipeline, n, class_labels)
        pipeline.check_inputs(batch_size, rows[:1] if rows else None, num_inference_steps, guidance_scale)
    labels = None if rows is None else [c for c in rows for _ in range(n)]
    total = n * n if rows is None else len(labels)
    pipeline = with_scheduler(pipeline, scheduler)
    chunks = []
    for start in range(0, total, batch_size):
        idx = range(start, min(start + batch_size, total))
        gens = [index_generator(seed, k) for k in idx]
        chunk_labels = None if labels is None else labels[idx.start : idx.stop]
        chunks.append(generate_images(pipeline, gens, chunk_labels, num_inference_steps, guidance_scale))
    return make_grid_image(np.concatenate(chunks), nrow=n)


def check_sample_conditions(
    pipeline: UViTPipelineBase, num_samples: int, batch_size: int, num_inference_steps: int, guidance_scale: float,
    class_labels: Sequence[ClassLabel] | None, prompts: Sequence[str] | None,
) -> list[int]:
    """Check a sample set's conditions before any work; returns the class ids labels are drawn from (none for
    unconditional and text-to-image models)."""
    if isinstance(pipeline, UViTText2ImagePipeline):
        if prompts is None or class_labels is not None:
            raise ValueError("a text-to-image model's sample set needs prompts (one per image), not class labels")
        if len(prompts) < num_samples or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: {len(prompts)} given for num_samples={num_samples}; give one string per "
                             "image (e.g. a captions file with one caption of each of num_samples images)")
        pipeline.check_inputs(list(prompts[:1]), None, None, None, None, None, num_inference_steps, guidance_scale)
        return []
    if prompts is not None:
        raise ValueError("prompts given for a model that is not text-conditional; give class_labels or none")
    choices = pipeline.get_label_ids(class_labels) if class_labels is not None else list(range(pipeline.num_classes))
    pipeline.check_inputs(batch_size, choices[:1] or None, num_inference_steps, guidance_scale)
    return choices


def generate_samples(
    pipeline: UViTPipelineBase,
    out_dir: str | os.PathLike,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    class_labels: Sequence[ClassLabel] | None = None,
    scheduler: str | SchedulerMixin | None = None,
    write_png: bool = True,
    write_npz: bool = False,
    accelerator: Accelerator | None = None,
    prompts: Sequence[str] | None = None,
) -> Path:
    """Generate `num_samples` images into `out_dir` as `000000.png`, … and/or `samples.npz`; returns `out_dir`.

    Resumable: indices whose PNG exists whole are skipped (PNGs are written atomically; one cut short by other
    means is made again). A set records its model and settings (`sample_set.json`, `sample_set_record`), and
    adding to a set of another model or other settings is refused before any work (`check_sample_set`). Under
    `accelerate launch` the missing indices are split across processes, each generated exactly once. A
    class-conditional model's labels are drawn uniformly from `class_labels` (default: all classes) with
    each image's own generator. A text-to-image model's image i is prompted by `prompts[i]` (the FID protocol's
    one caption per image: give at least `num_samples` prompts). With `write_png=False` the PNGs are kept in
    `out_dir/.parts` until the `.npz` (built in memory: N·H·W·3 bytes) is written.
    """
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not (write_png or write_npz):
        raise ValueError("nothing to write: set write_png and/or write_npz")
    SEED("seed", seed)
    choices = check_sample_conditions(pipeline, num_samples, batch_size, num_inference_steps, guidance_scale,
                                      class_labels, prompts)
    pipeline = with_scheduler(pipeline, scheduler)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={out_dir} is a file: a sample set is a folder; give a folder path")
    record = sample_set_record(pipeline, seed, num_inference_steps, guidance_scale, choices, prompts)
    check_sample_set(out_dir, record)

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)
    store = out_dir if write_png else out_dir / PARTS_DIR
    store.mkdir(parents=True, exist_ok=True)
    for folder in {out_dir, store}:  # the .npz goes to out_dir, the PNGs to store
        remove_partial_writes(folder)
    if rank == 0:
        write_text_atomic(out_dir / SET_RECORD, json.dumps(record, indent=1))
    todo = [i for i in range(num_samples) if not png_is_complete(png_path(store, i))]
    damaged = [png_path(store, i).name for i in todo if png_path(store, i).exists()]
    if damaged and rank == 0:
        print(f"{store}: {len(damaged)} image(s) cut short ({', '.join(damaged[:5])}"
              f"{', ...' if len(damaged) > 5 else ''}): made again")
    barrier()  # every process lists the missing indices before any writes one
    mine = todo[rank::world]

    start = time.perf_counter()
    with tqdm(total=len(mine), desc="sampling", unit="img", disable=rank != 0) as bar:
        for b in range(0, len(mine), batch_size):
            indices = mine[b : b + batch_size]
            gens = [index_generator(seed, i) for i in indices]
            if prompts is not None:
                conditions = [prompts[i] for i in indices]
            elif choices:  # a class label drawn by each image's generator, before its noise
                conditions = [choices[int(torch.randint(len(choices), (1,), generator=g))] for g in gens]
            else:
                conditions = None
            images = generate_images(pipeline, gens, conditions, num_inference_steps, guidance_scale)
            for i, image in zip(indices, images, strict=True):
                save_png_atomic(image, png_path(store, i))
            bar.update(len(indices))
    barrier()

    if rank == 0:
        seconds = time.perf_counter() - start
        print(
            f"generated {len(todo)} images ({num_samples - len(todo)} already present) in {seconds:.1f} s: "
            f"{len(todo) / max(seconds, 1e-9):.2f} images/s on {world} process(es)"
        )
        if write_npz:
            pack_npz(store, num_samples, out_dir / NPZ_NAME)
            if not write_png:
                shutil.rmtree(store)
    barrier()
    return out_dir


def sample_and_evaluate(
    pipeline: UViTPipelineBase,
    num_samples: int,
    reference: str | os.PathLike | np.ndarray | Dataset | Statistics | None = None,
    *,
    metrics: Sequence[str] = METRICS,
    weights: str | os.PathLike | InceptionWeights = "auto",
    scheduler: str | SchedulerMixin | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    class_labels: Sequence[ClassLabel] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    inception_batch_size: int = 50,
    kid_subset_size: int = 1000,
    samples_dir: str | os.PathLike | None = None,
    delete_samples: bool = False,
    save_stats: str | os.PathLike | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    prompts: Sequence[str] | None = None,
    clip_model: str | os.PathLike | ClipScorer | None = None,
) -> dict | None:
    """Generate a sample set of `num_samples` images with `generate_samples`, then score it with
    `uvit_cog.metrics.compute_metrics` against `reference`. Returns the metrics record on the main process
    (None on the others); its `sampler` field holds the sampling settings, `timing_s.generate` the seconds.
    A text-to-image model samples image i from `prompts[i]`; with `clip_model` (a CLIP model's name or folder)
    the record also holds the CLIP score of the images against their prompts (`metrics.clip_score`), the
    prompt-following measure FID lacks.

    The reference and the Inception weights are checked before any image is generated. Samples go to
    `samples_dir` (PNGs, kept, and resumed if the folder already holds some of this set) or, when it is None,
    to a temporary folder deleted afterwards. `delete_samples=True` makes `samples_dir` scratch space: emptied
    before sampling (stale images of another model are never reused) and deleted after, as training's periodic
    FID wants. Under `accelerate launch` pass the `accelerator`: every process samples its share into
    `samples_dir` (required then, and visible to the main process), the main process measures on
    `accelerator.device`; without one, Inception runs on the pipeline's device.
    """
    world = accelerator.num_processes if accelerator else 1
    is_main = accelerator.is_main_process if accelerator else True
    barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)
    if samples_dir is None and world > 1:
        raise ValueError("samples_dir is required with several processes: a folder every process can write")
    check_metric_names(metrics)
    if save_stats:
        check_output_file("save_stats", statistics_path(save_stats), (".npz",))
    ref = load_reference(reference) if is_main else None
    weights = weights if isinstance(weights, InceptionWeights) else resolve_weights(weights)
    if clip_model is not None and prompts is None:
        raise ValueError("clip_model scores images against their prompts: it needs a text-to-image model's prompts")
    if clip_model is not None and is_main and not isinstance(clip_model, ClipScorer):
        clip_model = ClipScorer.from_pretrained(clip_model, str(accelerator.device if accelerator else "auto"))
    device = str(accelerator.device if accelerator else pipeline.device)
    scratch = tempfile.TemporaryDirectory() if samples_dir is None else contextlib.nullcontext(samples_dir)
    delete_samples = delete_samples and samples_dir is not None  # a temporary folder goes anyway
    with scratch as folder:
        folder = Path(folder)
        if delete_samples and is_main:
            shutil.rmtree(folder, ignore_errors=True)
        barrier()
        start = time.perf_counter()
        generate_samples(pipeline, folder, num_samples, batch_size=batch_size, seed=seed,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         class_labels=class_labels, scheduler=scheduler, accelerator=accelerator, prompts=prompts)
        seconds = time.perf_counter() - start
        record = None
        if is_main:  # the set's own images 0 .. num_samples-1, nothing else the folder holds
            images = ImageFiles(sample_set_files(folder, num_samples))
            record = compute_metrics(images, ref, metrics=metrics, weights=weights, batch_size=inception_batch_size,
                                     device=device, seed=seed, kid_subset_size=kid_subset_size,
                                     save_stats=save_stats, progress=progress)
            record["input"].update(spec=str(folder), kind="sample set")
            if clip_model is not None:
                clip = clip_model.score(images, list(prompts[:num_samples]), batch_size=inception_batch_size)
                record["metrics"]["clip_score"] = clip.mean
                record["clip_model"] = clip_model.model.name_or_path
            record["sampler"] = {
                "scheduler": scheduler if scheduler is None or isinstance(scheduler, str) else type(scheduler).__name__,
                "steps": num_inference_steps,
                "guidance": guidance_scale,
                "classes": None if class_labels is None else list(class_labels),
                "prompts": None if prompts is None else len(prompts),
                "batch_size": batch_size,
                "num_samples": num_samples,
                "num_processes": world,
            }
            record["timing_s"]["generate"] = seconds
            if delete_samples:
                shutil.rmtree(folder, ignore_errors=True)
        barrier()
    return record
