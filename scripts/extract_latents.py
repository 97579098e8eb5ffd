"""Encode a class folder (root/<class>/<image>, the ImageNet layout) into VAE latents (data=latents).

    python scripts/extract_latents.py --data-root /path/to/imagenet/train --out /path/to/latents
    # several GPUs or machines: one process per worker, same --out
    python scripts/extract_latents.py ... --worker 0 --num-workers 4 --device cuda:0

Each image is center-cropped and resized (as U-ViT and ADM do), encoded together with its horizontal
flip, and stored as the VAE's moments [mean, logvar] (2C, H/8, W/8); training draws mean + std·eps and
multiplies by the VAE's scaling factor. Output: `meta.json` and shards `shard_XXXXX.{moments,labels}.npy`
(originals then flips of a block of `--shard-size` images). A shard is written under a temporary name and
renamed, so an interrupted run resumes where it stopped: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from uvit_cog.data import LATENT_META, ClassFolderDataset, shard_paths
from uvit_cog.rundir import atomic_write, write_text_atomic

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


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


@torch.no_grad()
def extract_latents(data_root: str | Path, out: str | Path, vae: str = DEFAULT_VAE, resolution: int = 256,
                    flip: bool = True, shard_size: int = 10000, batch_size: int = 64, num_loader_workers: int = 8,
                    device: str = "cuda" if torch.cuda.is_available() else "cpu", dtype: str = "float32",
                    worker: int = 0, num_workers: int = 1) -> Path:
    """Encode `data_root` into latent shards under `out` (this worker's shards `worker::num_workers`)."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"--worker {worker} must be in [0, --num-workers={num_workers})")
    if resolution % 8:
        raise ValueError(f"--resolution {resolution} must be a multiple of 8 (the VAE downsamples by 8)")
    dataset = ClassFolderDataset(data_root, resolution)
    autoencoder = AutoencoderKL.from_pretrained(vae).to(device).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(dataset) / shard_size)
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    write_meta(out, {
        "vae": str(vae), "scaling_factor": autoencoder.config.scaling_factor,
        "latent_channels": autoencoder.config.latent_channels, "latent_size": resolution // factor,
        "image_size": resolution, "flip": flip, "num_images": len(dataset), "shard_size": shard_size,
        "num_shards": num_shards, "classes": dataset.classes, "dtype": dtype, "data_root": str(data_root),
    })
    todo = [i for i in range(worker, num_shards, num_workers) if not shard_paths(out, i)[1].is_file()]
    for shard in tqdm(todo, desc=f"shards (worker {worker})", unit="shard"):
        items = Subset(dataset, range(shard * shard_size, min((shard + 1) * shard_size, len(dataset))))
        loader = DataLoader(items, batch_size=batch_size, num_workers=num_loader_workers)
        originals, flips, labels = [], [], []
        for x, y in loader:
            x = x.to(device)
            originals.append(autoencoder.encode(x).latent_dist.parameters.cpu())
            if flip:
                flips.append(autoencoder.encode(x.flip(-1)).latent_dist.parameters.cpu())
            labels.append(y)
        moments = torch.cat(originals + flips)  # the shard's originals, then their flips
        labels = torch.cat(labels * (2 if flip else 1))
        moments_path, labels_path = shard_paths(out, shard)
        save_npy_atomic(moments.numpy().astype(dtype), moments_path)
        save_npy_atomic(labels.numpy().astype(np.int64), labels_path)  # written last: marks the shard done
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="class folder (ImageNet layout): root/<class>/<image>")
    parser.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: Hub id or local folder")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="do not store flipped copies")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard (before flips)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (shards worker::num-workers)")
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    out = extract_latents(args.data_root, args.out, args.vae, args.resolution, args.flip, args.shard_size,
                          args.batch_size, args.loader_workers, args.device, args.dtype, args.worker,
                          args.num_workers)
    print(f"latents in {out}: train with data=latents data.root={out}")


if __name__ == "__main__":
    main()
