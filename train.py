"""Train U-ViT / U-ViC diffusion models from Hydra configs, on one CPU, one GPU or many GPUs and nodes.

    python train.py                                         # quickstart: a tiny U-ViC on scikit-learn digits
    python train.py experiment=quickstart_t2i               # the same digits, text-to-image from captions
    python train.py experiment=cifar10_uvic_s2 optim.lr=1e-4 model.depth=16
    accelerate launch --multi_gpu --num_processes 8 train.py experiment=imagenet64_uvic_m4 data.root=...
    accelerate launch --multi_gpu --num_processes 2 train.py train.cpu=true   # several CPU processes (gloo)

Everything lands in `run_dir` (the layout: `uvit_cog.rundir`): config.yaml, metrics.jsonl, sample grids,
verified atomic checkpoints with the EMA exported as a pipeline (`uvit_cog.checkpoints`), and the final
export `RUN/pipeline/`. A run that dies continues from its newest intact checkpoint when started again
(`resume=auto`). This file and train_setup.py (the config's checks and builders) are the only places that read
the Hydra config: the library gets explicit values. The step itself (batch preparation, loss, optimiser, EMA) is
`uvit_cog.training`'s; `run_training` below is the loop around it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from train_setup import (
    build_model,
    check_resume,
    diffusion_setup,
    tracker_config,
    validate_config,
    validation_runs,
)
from uvit_cog.backbones import condition_kind
from uvit_cog.backbones import num_classes as backbone_num_classes
from uvit_cog.checkpoints import (
    CheckpointError,
    export_final_pipeline,
    export_pipeline,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
    select_checkpoint_for_all,
)
from uvit_cog.conditioning import Condition, null_class_condition
from uvit_cog.data import (
    CaptionDraw,
    GlobalBatchSampler,
    LatentDataset,
    build_dataset,
    build_validation_dataset,
    caption_source,
    evenly_spaced,
    is_captioned,
    read_latent_meta,
)
from uvit_cog.pipeline import build_pipeline, read_prompts
from uvit_cog.rundir import TEXT_ENCODER_DIR, MetricsLog, RunInUseError, RunLock, atomic_write, write_config
from uvit_cog.sampling import sample_and_evaluate, sample_grid
from uvit_cog.schedule import default_scheduler
from uvit_cog.text import build_random_text_encoder, encode_prompts, load_text_encoder
from uvit_cog.training import (
    GlobalBatchRandom,
    check_ranks_in_sync,
    prepare_batch,
    train_step,
    validation_images,
    validation_loss,
)

# ----------------------------------------------------------------------------------------------------------
# The condition: what the model is conditioned on, its null value and, for text, the encoder


@dataclass
class Conditioning:
    """The model's condition kind (`uvit_cog.conditioning`) with what training needs of it: the null condition
    (one row), the text encoder and tokenizer (text models; exported with the pipeline), and `encode_text` for
    captions that arrive as text (None when the data holds extracted features)."""

    kind: str
    null: Condition | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object = None
    encode_text: Callable[[list[str]], Tensor] | None = None


def text_encoder_for(cfg: DictConfig, run_dir: Path) -> tuple[torch.nn.Module, object]:
    """The run's text encoder: `data.text_encoder` (a name or folder; for extracted features, null means the one
    that made them) or "random", a frozen random CLIP text model (`uvit_cog.text.build_random_text_encoder`) made
    on the run's first start and kept in RUN/text_encoder, so a resumed run and its exports use the same one."""
    name = cfg.data.get("text_encoder") or (read_latent_meta(cfg.data.root)["text_encoder"]
                                             if cfg.data.kind == "latents" else None)
    if name != "random":
        return load_text_encoder(name)
    saved = run_dir / TEXT_ENCODER_DIR
    if not (saved / "text_encoder").is_dir():  # the words of captions written from labels: one token each
        phrases = [t.format(n) for t in cfg.data.get("caption_templates") or [] for names in
                   cfg.data.get("caption_names") or [] for n in names]
        encoder, tokenizer = build_random_text_encoder(cfg.model.text_dim, cfg.model.num_text_tokens, seed=0,
                                                       words=[w for p in phrases for w in p.split()])
        encoder.save_pretrained(saved / "text_encoder")
        tokenizer.save_pretrained(saved / "tokenizer")
    return load_text_encoder(saved, subfolder="text_encoder")


def conditioning(cfg: DictConfig, accelerator: Accelerator, model_config: dict, dataset) -> Conditioning:
    """The `Conditioning` of the config's model on the config's data."""
    kind, device = condition_kind(model_config), accelerator.device
    if kind == "class":
        return Conditioning(kind, null=null_class_condition(backbone_num_classes(model_config), 1, device))
    if kind == "none":
        return Conditioning(kind)
    with accelerator.main_process_first():  # the main process makes a random encoder; the others then load it
        encoder, tokenizer = text_encoder_for(cfg, Path(cfg.run_dir))
    encoder = encoder.to(device)
    tokens = model_config["num_text_tokens"]
    encode = lambda captions: encode_prompts(encoder, tokenizer, captions, tokens, device)  # noqa: E731
    source = dataset
    while isinstance(source, torch.utils.data.Subset):
        source = source.dataset
    features = isinstance(source, LatentDataset)
    null = source.empty_text_features()[None].to(device) if features else encode([""])
    return Conditioning(kind, {"encoder_hidden_states": null}, encoder, tokenizer, None if features else encode)


def latent_vae(cfg: DictConfig) -> AutoencoderKL | None:
    """The VAE of latent data (it decodes the grids and ships with the exports), None for pixel data. Its scaling
    factor is set to `data.scale_factor`, the one training multiplies latents by, so that the exported pipeline
    decodes as trained: U-ViT trains Stable Diffusion's latents at 0.23010, though the VAE's own config says
    0.18215."""
    if cfg.data.kind != "latents":
        return None
    vae = AutoencoderKL.from_pretrained(cfg.data.vae or read_latent_meta(cfg.data.root)["vae"])
    if vae.config.scaling_factor != cfg.data.scale_factor:
        vae.register_to_config(scaling_factor=cfg.data.scale_factor)
    return vae


def grid_prompts(cfg: DictConfig, dataset, num: int) -> list[str] | None:
    """The sample grids' prompts: `sample.prompts`, else the first caption of `num` evenly spaced training items."""
    if cfg.sample.get("prompts"):
        return list(cfg.sample.prompts)
    if not is_captioned(dataset):
        return None
    return [source.captions(j)[0] for source, j in
            (caption_source(dataset, i) for i in evenly_spaced(len(dataset), min(num, len(dataset))))]


# ----------------------------------------------------------------------------------------------------------
# Training


def train(cfg: DictConfig) -> Path:
    """Train from a composed config and return the run directory."""
    validate_config(cfg, PartialState(cpu=cfg.train.cpu).num_processes)
    run_dir = Path(cfg.run_dir)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu,
                              step_scheduler_with_optimizer=False, log_with=list(cfg.log.trackers) or None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "trackers")))
    lock = RunLock(run_dir)
    if accelerator.is_main_process:  # one training per run directory; the ranks of one launch share it
        for note in filter(None, [lock.acquire(), *recover_checkpoints(run_dir)]):
            accelerator.print(f"{run_dir}: {note}")
    try:
        return run_training(cfg, accelerator)
    finally:
        lock.release()


@dataclass
class Tally:
    """Loss and gradient norm summed over the steps since the last metrics record, and the time they took."""

    device: torch.device
    loss: Tensor = field(init=False)
    norm: Tensor = field(init=False)
    steps: int = 0       # steps that updated the weights
    interval: int = 0    # all steps since the last record
    clock: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent validating, sampling and saving, not training

    def __post_init__(self) -> None:
        self.loss, self.norm = torch.zeros((), device=self.device), torch.zeros((), device=self.device)


def run_training(cfg: DictConfig, accelerator: Accelerator) -> Path:
    """The training itself, once the run directory is this process's and interrupted saves are undone."""
    run_dir, device = Path(cfg.run_dir), accelerator.device
    resume_from = select_checkpoint_for_all(accelerator, run_dir, cfg.resume)  # after the recovery above
    provenance = check_resume(cfg, resume_from, log=accelerator.print)  # what the checkpoints record as this run
    dataset = build_dataset(OmegaConf.to_container(cfg.data, resolve=True))  # plain values, never a DictConfig
    vae = latent_vae(cfg)
    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    cond = conditioning(cfg, accelerator, dict(model.config), dataset)
    parts = TrainingParts.build(cfg, accelerator, model, vae, cond)
    step, images_seen, skipped = 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, parts.ema)
        step, images_seen, skipped = state["step"], state["images_seen"], state.get("skipped_steps", 0)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    micro_batch, batches = training_batches(cfg, accelerator, dataset, cond, images_seen)
    if cfg.log.trackers:
        accelerator.init_trackers(cfg.name, config=tracker_config(cfg),
                                  init_kwargs={"tensorboard": {"purge_step": step + 1}})  # drop the dead run's tail
    metrics = MetricsLog(run_dir, accelerator.is_main_process, resume_step=step,
                         trackers=(lambda values, at: accelerator.log(values, step=at)) if cfg.log.trackers else None)
    tasks = PeriodicTasks(cfg, accelerator, parts, metrics, dataset, cond, provenance)
    accelerator.print(f"{type(parts.ema).__name__}: {sum(p.numel() for p in parts.ema.parameters()) / 1e6:.2f} M "
                      f"parameters, {len(dataset)} training items, {accelerator.num_processes} process(es), run "
                      f"directory {run_dir}")
    if accelerator.is_main_process:  # once the data and model are built: a start that fails before writes nothing
        write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
    progress = tqdm(total=cfg.train.steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    tally = Tally(device)
    while step < cfg.train.steps:
        t = cfg.train
        result = train_step(accelerator, parts.model, parts.optimizer, parts.lr_scheduler, parts.ema, parts.objective,
                            lambda micro: micro_batch(next(batches), step, micro), step=step,  # noqa: B023
                            grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm, ema_decay=t.ema_decay,
                            ema_warmup=t.ema_warmup, nonfinite=t.nonfinite)
        if result.stepped:
            tally.loss += result.loss
            tally.norm += result.grad_norm
            tally.steps += 1
        else:
            skipped += 1
            accelerator.print(f"step {step + 1}: non-finite loss or gradients, step skipped ({skipped} so far)")
        step, images_seen, tally.interval = step + 1, images_seen + t.batch_size, tally.interval + 1
        progress.update(1)
        if step % cfg.log.every == 0 or step == t.steps:
            log_training(metrics, accelerator, tally, step, result.lr, skipped, images_seen, t.batch_size, progress)
            tally = Tally(device)
        pause_start = time.perf_counter()
        tasks.after_step(step, {"step": step, "images_seen": images_seen, "processes": accelerator.num_processes,
                                "skipped_steps": skipped})
        tally.paused += time.perf_counter() - pause_start
    progress.close()
    tasks.finish(step)
    accelerator.end_training()
    return run_dir


def log_training(metrics: MetricsLog, accelerator: Accelerator, tally: Tally, step: int, lr: float, skipped: int,
                 images_seen: int, batch_size: int, progress: tqdm) -> None:
    """One metrics.jsonl record of the steps since the last: mean loss and gradient norm (over the steps that
    updated the weights), the learning rate, throughput (training time only) and the counters."""
    n = max(tally.steps, 1)
    loss = accelerator.reduce(tally.loss, "mean").item() / n
    seconds = time.perf_counter() - tally.clock - tally.paused
    record = {"step": step, "loss": loss if tally.steps else None, "lr": lr,
              "grad_norm": tally.norm.item() / n if tally.steps else None, "skipped_steps": skipped,
              "images_per_s": tally.interval * batch_size / seconds, "images_seen": images_seen}
    metrics.log(record)
    progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.1f}")


def training_batches(cfg: DictConfig, accelerator: Accelerator, dataset, cond: Conditioning, images_seen: int,
                     ) -> tuple[Callable[[dict, int, int], tuple[Tensor, Condition, GlobalBatchRandom]], Iterator]:
    """This rank's endless batches (its slice of every global micro-batch, from stream position `images_seen`:
    `GlobalBatchSampler`; one caption drawn per sample for captioned data: `CaptionDraw`) and the function that
    turns a batch into the step's input with the step's draws (`uvit_cog.training.prepare_batch`)."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    micro_size = cfg.train.batch_size // cfg.train.grad_accum  # global
    local = micro_size // world
    captioned = cond.kind == "text" and is_captioned(dataset)
    sampler = GlobalBatchSampler(len(dataset), micro_size, rank, world, cfg.seed, start=images_seen,
                                 positions=captioned)
    loader = DataLoader(CaptionDraw(dataset, cfg.seed) if captioned else dataset, batch_size=local, sampler=sampler,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0)
    latent_scale = cfg.data.scale_factor if cfg.data.kind == "latents" else None

    def micro_batch(batch: dict, step: int, micro: int) -> tuple[Tensor, Condition, GlobalBatchRandom]:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        offset = micro * micro_size + rank * local  # this slice's rows in the global batch
        rnd = GlobalBatchRandom(cfg.seed, step, offset, local, cfg.train.batch_size, device)
        x, condition = prepare_batch(batch, rnd, cond.kind, hflip=cfg.data.hflip, latent_scale=latent_scale,
                                     dropout=cfg.train.condition_dropout, null=cond.null,
                                     encode_text=cond.encode_text)
        return x, condition, rnd

    return micro_batch, iter(loader)


@dataclass
class TrainingParts:
    """The model (prepared by accelerate), its EMA, optimiser, LR schedule, objective, noise schedule, the VAE of
    latent data, and the EMA's pipeline (sample grids, FID, exports)."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    objective: object
    noise_schedule: dict
    vae: AutoencoderKL | None
    text_encoder: torch.nn.Module | None
    tokenizer: object
    pipeline: object

    @classmethod
    def build(cls, cfg: DictConfig, accelerator: Accelerator, model: torch.nn.Module, vae: AutoencoderKL | None,
              cond: Conditioning) -> TrainingParts:
        device = accelerator.device
        if cfg.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        ema = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                      eps=o.eps)
        lr_scheduler = get_scheduler(o.lr_schedule, optimizer, num_warmup_steps=o.warmup_steps,
                                     num_training_steps=cfg.train.steps)
        if cfg.train.compile:
            model = torch.compile(model)
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        noise_schedule, objective = diffusion_setup(cfg)
        vae = vae.to(device) if vae is not None else None
        pipeline = build_pipeline(ema, default_scheduler(noise_schedule), vae, cond.text_encoder, cond.tokenizer)
        pipeline.set_progress_bar_config(disable=True)
        return cls(model, ema, optimizer, lr_scheduler, objective, noise_schedule, vae, cond.text_encoder,
                   cond.tokenizer, pipeline)

    def export(self, out: Path) -> None:
        """The EMA model as a pipeline directory (with the text encoder of a text-to-image model)."""
        export_pipeline(self.ema, self.noise_schedule, self.vae, out, self.text_encoder, self.tokenizer)


class PeriodicTasks:
    """What runs between steps at its interval: the validation loss, sample grids, FID, checkpoints; and at the
    end the last grid and the final export."""

    def __init__(self, cfg: DictConfig, accelerator: Accelerator, parts: TrainingParts, metrics: MetricsLog,
                 dataset, cond: Conditioning, provenance: dict) -> None:
        self.cfg, self.accelerator, self.parts, self.metrics = cfg, accelerator, parts, metrics
        self.provenance = provenance  # what defines the run (train_setup.check_resume), saved in every checkpoint
        self.run_dir = Path(cfg.run_dir)
        self.prompts = grid_prompts(cfg, dataset, cfg.sample.grid_size) if cond.kind == "text" else None
        self.val_x0 = self.val_condition = None  # fixed images, noise and t grid (uvit_cog.training)
        if validation_runs(cfg):
            self.val_x0, self.val_condition = validation_images(
                build_validation_dataset(OmegaConf.to_container(cfg.data, resolve=True)), cfg.val.num_images,
                cond.kind, seed=cfg.val.seed, latent_scale=cfg.data.scale_factor if parts.vae is not None else None,
                encode_text=cond.encode_text)

    def after_step(self, step: int, train_state: dict) -> None:
        cfg = self.cfg
        if self.val_x0 is not None and step % cfg.val.every == 0:
            self.validate(step)
        if cfg.log.sample_every and step % cfg.log.sample_every == 0:
            self.save_grid(step)
        if cfg.fid.every and step % cfg.fid.every == 0:
            self.fid(step)
        if cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            check_ranks_in_sync(self.accelerator, model=self.accelerator.unwrap_model(self.parts.model),
                                ema=self.parts.ema)
            save_checkpoint(self.accelerator, self.run_dir, step, train_state, self.parts.export,
                            cfg.log.keep_checkpoints, self.provenance)

    def finish(self, step: int) -> None:
        if not (self.cfg.log.sample_every and step % self.cfg.log.sample_every == 0):
            self.save_grid(step)  # the final grid
        if self.accelerator.is_main_process:
            p = self.parts
            out = export_final_pipeline(p.ema, p.noise_schedule, p.vae, self.run_dir, p.text_encoder, p.tokenizer)
            self.accelerator.print(f"done: EMA pipeline in {out}, sample grids in {self.run_dir / 'samples'}")
        self.accelerator.wait_for_everyone()

    def validate(self, step: int) -> None:
        """The validation loss (main process): val.* and uvit_cog.training.validation_loss."""
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            start = time.perf_counter()
            model = self.parts.ema if cfg.val.ema else accelerator.unwrap_model(self.parts.model)
            with accelerator.autocast():
                record = validation_loss(model, self.parts.objective, self.val_x0, self.val_condition,
                                         cfg.val.num_timesteps, cfg.val.seed, cfg.val.batch_size)
            self.metrics.log({"step": step, **record, "val_num_images": len(self.val_x0),
                              "val_seconds": time.perf_counter() - start})
        accelerator.wait_for_everyone()

    def save_grid(self, step: int) -> None:
        if self.accelerator.is_main_process:
            s = self.cfg.sample
            with self.accelerator.autocast():
                grid = sample_grid(self.parts.pipeline, n=s.grid_size, seed=s.seed, num_inference_steps=s.steps,
                                   guidance_scale=s.guidance, scheduler=s.scheduler, batch_size=s.batch_size,
                                   prompts=self.prompts)
            path = self.run_dir / "samples" / f"step_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                grid.save(f, format="PNG")
        self.accelerator.wait_for_everyone()

    def fid(self, step: int) -> None:
        """FID of the EMA model (text models: image i from prompt i of fid.prompts_file; with fid.clip_model the
        CLIP score too, the MS-COCO protocol's periodic FID-10k)."""
        f = self.cfg.fid
        prompts = read_prompts(f.prompts_file) if f.get("prompts_file") else None
        with self.accelerator.autocast():
            record = sample_and_evaluate(
                self.parts.pipeline, f.num_images, f.reference, metrics=("fid",), weights=f.weights,
                scheduler=f.scheduler, num_inference_steps=f.steps, guidance_scale=f.guidance, seed=f.seed,
                batch_size=f.batch_size, samples_dir=self.run_dir / "fid" / f"step_{step:07d}", delete_samples=True,
                accelerator=self.accelerator, progress=False, prompts=prompts, clip_model=f.get("clip_model"))
        if record is not None:  # the main process
            clip = {"clip_score": record["metrics"]["clip_score"]} if "clip_score" in record["metrics"] else {}
            self.metrics.log({"step": step, "fid": float(record["metrics"]["frechet_inception_distance"]),
                              "fid_num_images": f.num_images, **clip})


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (CheckpointError, FloatingPointError, RunInUseError) as e:  # said in full: no traceback needed
        raise SystemExit(f"train.py: {e}") from None


if __name__ == "__main__":
    main()
