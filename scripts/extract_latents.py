"""Encode images into VAE latents (data=latents), and for text-to-image the text features of every caption.

    # ImageNet layout (root/<class>/<image>): class-conditional latents, with flipped copies
    python scripts/extract_latents.py --data-root /path/to/imagenet/train --out /path/to/latents
    # MS-COCO 2014 as downloaded (U-ViT's preprocessing: centre crop, LANCZOS, no flips) + CLIP ViT-L/14 features
    python scripts/extract_latents.py --data-root /path/to/coco --captions coco --split train2014 \\
        --out /path/to/coco256_train --vae /path/to/sd-vae --text-encoder openai/clip-vit-large-patch14
    # a folder with a metadata.jsonl of file_name and text
    python scripts/extract_latents.py --data-root /path/to/folder --captions folder --out /path/to/latents
    # several GPUs: every process takes its share of the shards
    accelerate launch --num_processes 8 scripts/extract_latents.py ... (same --out)

Each image is stored as the VAE's moments [mean, logvar] (2C, H/8, W/8); training draws mean + std·eps at every
step (as U-ViT does) and multiplies by the data's scale factor. Captioned data also stores the features of every
caption (the text encoder's last hidden state over its padded tokens, no mask: `uvit_cog.text.encode_prompts`),
the captions themselves, and the empty prompt's features (`empty_text.npy`, the null condition); `meta.json`
records the VAE, the text encoder, the feature shape and the storage dtypes, and training refuses features of
another encoder or width than its model's. Output: `meta.json` and shards `shard_XXXXX.{moments,labels}.npy`
(+ `.text.npy`, `.caption_index.npy`, `.captions.json`): a block of `--shard-size` images, then their flips if
`--flip`. A shard's files are written under temporary names and renamed, its labels file last, so an interrupted
run resumes where it stopped: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from uvit_cog.captions import CaptionedImageDataset, collate_captioned
from uvit_cog.data import CAPTION_FORMATS, EMPTY_TEXT, LATENT_META, ClassFolderDataset, shard_paths, text_shard_paths
from uvit_cog.rundir import atomic_write, write_text_atomic
from uvit_cog.text import CLIP_L14, encode_prompts, load_text_encoder, text_width

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DTYPES = ("float32", "float16")


def save_npy_atomic(array: np.ndarray, path: Path) -> None:
    """np.save through `rundir.atomic_write`, so an interruption never leaves a truncated shard."""
    with atomic_write(path) as f:
        np.save(f, array)


def write_meta(out: Path, meta: dict) -> None:
    """Write meta.json, or check that an existing one (a resumed extraction) describes the same job."""
    path = out / LATENT_META
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            raise ValueError(f"{out} holds latents of another extraction (old, new): {diff}; use another --out")
        return
    write_text_atomic(path, json.dumps(meta, indent=1))


def open_images(data_root: str | Path, captions: str | None, split: str, resolution: int) -> Dataset:
    """The images to encode: a class folder, or a captioned source (`uvit_cog.captions`)."""
    if captions is None:
        return ClassFolderDataset(data_root, resolution)
    if captions == "coco":
        return CaptionedImageDataset.from_coco(data_root, split, resolution)
    return CaptionedImageDataset.from_folder(data_root, resolution)


@torch.no_grad()
def extract_latents(data_root: str | Path, out: str | Path, vae: str = DEFAULT_VAE, resolution: int = 256,
                    flip: bool | None = None, shard_size: int = 10000, batch_size: int = 64,
                    num_loader_workers: int = 8, device: str | None = None, dtype: str = "float32",
                    worker: int | None = None, num_workers: int | None = None, captions: str | None = None,
                    split: str = "train2014", text_encoder: str = CLIP_L14, num_text_tokens: int = 77,
                    text_dtype: str = "float32") -> Path:
    """Encode `data_root` into latent shards under `out`: this worker's shards `worker::num_workers` (by default
    the rank and process count of an `accelerate launch`, else 0 of 1). `captions` ("coco" or "folder") reads a
    captioned source and stores its text features too; `flip` defaults to True for class folders and False for
    captioned data (U-ViT's MS-COCO models train without flips)."""
    state = PartialState(cpu=device == "cpu")
    worker = state.process_index if worker is None else worker
    num_workers = state.num_processes if num_workers is None else num_workers
    device = device or str(state.device)
    if not 0 <= worker < num_workers:
        raise ValueError(f"--worker {worker} must be in [0, --num-workers={num_workers})")
    if resolution % 8:
        raise ValueError(f"--resolution {resolution} must be a multiple of 8 (the VAE downsamples by 8)")
    if captions is not None and captions not in CAPTION_FORMATS:
        raise ValueError(f"--captions {captions}: choose one of {CAPTION_FORMATS}")
    for name, value in (("--dtype", dtype), ("--text-dtype", text_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} {value}: choose one of {DTYPES}")
    flip = captions is None if flip is None else flip
    dataset = open_images(data_root, captions, split, resolution)
    autoencoder = AutoencoderKL.from_pretrained(vae).to(device).eval()
    encoder = tokenizer = None
    if captions is not None:
        encoder, tokenizer = load_text_encoder(text_encoder)
        encoder = encoder.to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(dataset) / shard_size)
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    meta = {
        "vae": str(vae), "scaling_factor": autoencoder.config.scaling_factor,
        "latent_channels": autoencoder.config.latent_channels, "latent_size": resolution // factor,
        "image_size": resolution, "flip": flip, "num_images": len(dataset), "shard_size": shard_size,
        "num_shards": num_shards, "classes": getattr(dataset, "classes", []), "dtype": dtype,
        "data_root": str(data_root),
    }
    if encoder is not None:
        meta.update(captions=captions, split=split if captions == "coco" else None, text_encoder=str(text_encoder),
                    text_dim=text_width(encoder), num_text_tokens=num_text_tokens, text_dtype=text_dtype)
    if state.is_main_process:  # (each process of a manual --worker split is its own main process)
        write_meta(out, meta)
        if encoder is not None and not (out / EMPTY_TEXT).is_file():
            empty = encode_prompts(encoder, tokenizer, [""], num_text_tokens, device)[0]
            save_npy_atomic(empty.float().cpu().numpy(), out / EMPTY_TEXT)
    state.wait_for_everyone()
    if not state.is_main_process:
        write_meta(out, meta)  # checks that this process extracts the job the folder holds

    todo = [i for i in range(worker, num_shards, num_workers) if not shard_paths(out, i)[1].is_file()]
    for shard in tqdm(todo, desc=f"shards (worker {worker})", unit="shard"):
        items = Subset(dataset, range(shard * shard_size, min((shard + 1) * shard_size, len(dataset))))
        loader = DataLoader(items, batch_size=batch_size, num_workers=num_loader_workers,
                            collate_fn=collate_captioned if encoder is not None else None)
        originals, flips, labels, texts = [], [], [], []
        for batch in loader:
            x = batch["x"].to(device)
            originals.append(autoencoder.encode(x).latent_dist.parameters.cpu())
            if flip:
                flips.append(autoencoder.encode(x.flip(-1)).latent_dist.parameters.cpu())
            labels.append(batch["class_labels"] if "class_labels" in batch else torch.zeros(len(x), dtype=torch.long))
            texts.extend(batch.get("captions", []))
        copies = 2 if flip else 1
        moments = torch.cat(originals + flips)  # the shard's originals, then their flips
        moments_path, labels_path = shard_paths(out, shard)
        if encoder is not None:
            save_text_shard(out, shard, texts, copies, encoder, tokenizer, num_text_tokens, text_dtype, batch_size,
                            device)
        save_npy_atomic(moments.numpy().astype(dtype), moments_path)
        save_npy_atomic(torch.cat(labels * copies).numpy().astype(np.int64), labels_path)  # last: marks it done
    return out


def save_text_shard(out: Path, shard: int, captions: list[list[str]], copies: int, encoder: torch.nn.Module,
                    tokenizer: object, num_text_tokens: int, dtype: str, batch_size: int, device: str) -> None:
    """The features of every caption of a shard's images, each image's (start, count) into them (a flipped copy
    shares its original's), and the caption texts."""
    flat = [c for image in captions for c in image]
    features = torch.cat([encode_prompts(encoder, tokenizer, flat[i : i + batch_size], num_text_tokens, device).cpu()
                          for i in range(0, len(flat), batch_size)])
    counts = np.array([len(image) for image in captions], dtype=np.int64)
    index = np.stack([np.cumsum(counts) - counts, counts], axis=1)
    text_path, index_path, captions_path = text_shard_paths(out, shard)
    save_npy_atomic(features.float().numpy().astype(dtype), text_path)
    save_npy_atomic(np.concatenate([index] * copies), index_path)
    write_text_atomic(captions_path, json.dumps(captions * copies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True,
                        help="class folder (ImageNet layout: root/<class>/<image>), or a captioned source (--captions)")
    parser.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    parser.add_argument("--captions", choices=CAPTION_FORMATS, default=None,
                        help="coco: MS-COCO as downloaded; folder: a metadata.jsonl folder. Stores text features too")
    parser.add_argument("--split", default="train2014", help="MS-COCO split folder (train2014, val2014, ...)")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: Hub id or local folder")
    parser.add_argument("--text-encoder", default=CLIP_L14, help="transformers text encoder: Hub id or folder")
    parser.add_argument("--num-text-tokens", type=int, default=77, help="prompts padded to this many tokens")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="also store flipped copies (default: yes for class folders, no for captioned data)")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard (before flips)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: accelerate's device for this process")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype of the moments")
    parser.add_argument("--text-dtype", default="float32", choices=DTYPES, help="storage dtype of the features")
    parser.add_argument("--worker", type=int, default=None,
                        help="this worker's index (shards worker::num-workers); default: accelerate's rank")
    parser.add_argument("--num-workers", type=int, default=None, help="default: accelerate's process count")
    args = parser.parse_args()
    out = extract_latents(args.data_root, args.out, args.vae, args.resolution, args.flip, args.shard_size,
                          args.batch_size, args.loader_workers, args.device, args.dtype, args.worker,
                          args.num_workers, args.captions, args.split, args.text_encoder, args.num_text_tokens,
                          args.text_dtype)
    print(f"latents in {out}: train with data=latents data.root={out}")


if __name__ == "__main__":
    main()
