"""Sample a trained model: an image grid (mode=grid) or a resumable, shardable FID sample set (mode=fid).

    python sample.py model=runs/cifar10 mode=grid scheduler=dpm_solver steps=25
    accelerate launch sample.py model=runs/cifar10 mode=fid num_samples=50000 npz=true
    python sample.py model=runs/quickstart_t2i prompt="four handwritten"              # text-to-image: a prompt,
    python sample.py model=converted/mscoco_uvic_small prompt="[a red bus,two cats]" guidance=2 # a list,
    python sample.py model=PATH prompts_file=prompts.txt                           # or a file, one a line
    accelerate launch sample.py model=PATH mode=fid prompts_file=mscoco_fid/prompts.txt num_samples=30000

See conf/sample.yaml for every option.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from uvit_cog.checkpoints import check_model_dir
from uvit_cog.checks import SEED, Bool, Choice, Float, Int, check_fields, check_output_dir, check_output_file
from uvit_cog.pipeline import load_pipeline, read_prompts
from uvit_cog.rundir import atomic_write
from uvit_cog.sampling import generate_samples, sample_grid
from uvit_cog.schedule import SCHEDULER_NAMES, check_scheduler, scheduler_family

CONFIG = Path(__file__).resolve().parent / "conf" / "sample.yaml"
# conf/ also holds training's `model/` config group, which would read `model=PATH` as a group choice;
# registered on its own, the config keeps `model` a plain value.
ConfigStore.instance().store(name="sample", node=OmegaConf.load(CONFIG))

MODES = ("grid", "fid")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Every option of conf/sample.yaml but model, classes and out (checked below): type, range, names.
CHECKS = {
    "mode": Choice(MODES), "dtype": Choice(list(DTYPES)), "scheduler": Choice(SCHEDULER_NAMES, optional=True),
    "steps": Int(1), "guidance": Float(), "seed": SEED, "batch_size": Int(1), "grid_size": Int(1),
    "num_samples": Int(1), "png": Bool(), "npz": Bool(),
}


def check_config(cfg: DictConfig) -> Path:
    """Reject bad options before loading anything; returns the pipeline directory to load."""
    check_fields(OmegaConf.to_container(cfg, resolve=True), CHECKS)
    if cfg.mode == "fid" and not (cfg.png or cfg.npz):
        raise ValueError("png=false and npz=false: a sample set needs PNGs or an .npz; set png=true or npz=true")
    path = check_model_dir(cfg.model)  # the path named if missing; a damaged export named with intact checkpoints
    text = json.loads((path / "model_index.json").read_text()).get("_class_name") == "UViTText2ImagePipeline"
    prompts = requested_prompts(cfg)
    if text and prompts is None:
        raise ValueError(f"model={cfg.model} is a text-to-image model: give prompt=\"...\" (or a list), or "
                         "prompts_file=FILE (one prompt a line)")
    if not text and prompts is not None:
        raise ValueError(f"model={cfg.model} is not text-conditional: drop prompt/prompts_file (classes= picks "
                         "classes)")
    if text and cfg.classes is not None:
        raise ValueError(f"classes={cfg.classes}: model={cfg.model} is text-to-image; give prompts instead")
    if text and cfg.mode == "fid" and 1 < len(prompts) < cfg.num_samples:
        raise ValueError(f"num_samples={cfg.num_samples} but {len(prompts)} prompts: a sample set takes one prompt "
                         f"per image (or one prompt for all); give at least {cfg.num_samples}, or lower num_samples")
    if cfg.scheduler is not None:  # a sampler of the model's objective (DDPM or flow matching), named both if not
        saved = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        check_scheduler(cfg.scheduler, scheduler_family(saved))
    if cfg.mode == "grid":
        check_output_file("out", output_path(cfg), (".png",))
    else:
        check_output_dir("out", output_path(cfg))
    return path


def requested_classes(cfg: DictConfig) -> list[int | str] | None:
    """`classes` as a list: one class (`classes=3`, `classes=cat`) or a list (`classes=[cat,dog]`); None for all."""
    if cfg.classes is None:
        return None
    return OmegaConf.to_container(cfg.classes) if OmegaConf.is_list(cfg.classes) else [cfg.classes]


def requested_prompts(cfg: DictConfig) -> list[str] | None:
    """The prompts of `prompt` (one, or a list) or of `prompts_file` (one a line); None when neither is given."""
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise ValueError("give prompt or prompts_file, not both")
    if cfg.prompts_file is not None:
        return read_prompts(cfg.prompts_file)
    if cfg.prompt is None:
        return None
    prompts = OmegaConf.to_container(cfg.prompt) if OmegaConf.is_list(cfg.prompt) else [cfg.prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt={cfg.prompt}: give a string or a list of strings")
    return prompts


def output_path(cfg: DictConfig) -> Path:
    """`out`, or MODEL/samples/<mode>-<settings>[.png], so rerunning the same command resumes the same set."""
    if cfg.out is not None:
        return Path(cfg.out)
    tag = f"{cfg.mode}-{cfg.scheduler or 'saved'}-{cfg.steps}steps-g{cfg.guidance}-seed{cfg.seed}"
    classes, prompts = requested_classes(cfg), requested_prompts(cfg)
    if classes is not None:
        tag += "-classes" + "_".join(str(c) for c in classes)
    if prompts is not None:  # the prompts' own digest: another prompt list, another set
        tag += "-prompts" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:10]
    return Path(cfg.model) / "samples" / (tag + (".png" if cfg.mode == "grid" else ""))


@hydra.main(version_base=None, config_path=None, config_name="sample")
def main(cfg: DictConfig) -> None:
    path = check_config(cfg)
    accelerator = Accelerator()
    pipe = load_pipeline(path, dtype=DTYPES[cfg.dtype]).to(accelerator.device)
    pipe.set_progress_bar_config(disable=cfg.mode == "fid" or not accelerator.is_main_process)
    sampler = dict(
        seed=cfg.seed, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
        scheduler=cfg.scheduler, batch_size=cfg.batch_size, class_labels=requested_classes(cfg),
    )
    out, prompts = output_path(cfg), requested_prompts(cfg)

    if cfg.mode == "grid":
        if accelerator.is_main_process:
            image = sample_grid(pipe, n=cfg.grid_size, prompts=prompts, **sampler)
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out) as f:
                image.save(f, format="PNG")
            print(f"wrote {out} ({image.width}x{image.height})")
    else:
        if prompts is not None and len(prompts) == 1:
            prompts = prompts * cfg.num_samples  # one prompt for every image of the set
        generate_samples(
            pipe, out, num_samples=cfg.num_samples, write_png=cfg.png, write_npz=cfg.npz,
            accelerator=accelerator, prompts=prompts, **sampler,
        )
        accelerator.print(f"wrote {out}")


if __name__ == "__main__":
    main()
