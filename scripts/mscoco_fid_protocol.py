"""The paper's MS-COCO FID protocol, prepared once: the prompts (one caption each of N distinct val2014 images) and
the reference statistics of val2014 at 256x256; and the FID between two statistics files.

    python scripts/mscoco_fid_protocol.py prompts --coco /path/to/coco --out mscoco_fid          # 30,000 prompts
    python scripts/mscoco_fid_protocol.py stats --coco /path/to/coco --out mscoco_fid            # val2014 mu, sigma
    python scripts/mscoco_fid_protocol.py compare mscoco_fid/fid_stats_mscoco256_val.npz fid_stats_mscoco256_val.npz

`prompts` writes OUT/prompts.txt (prompt i makes image i: `sample.py mode=fid prompts_file=...`, `eval/score.py
prompts_file=...`) and OUT/prompts.json (each prompt's image file and caption index). `stats` writes
OUT/fid_stats_mscoco256_val.npz: Inception pool3 (mu, sigma) of every val2014 image prepared as U-ViT prepares
MS-COCO (centre square crop, LANCZOS to 256). U-ViT's released `fid_stats_mscoco256_val.npz` (made by no script in
its repository) can be the reference instead; `compare` gives the FID between the two, 0 for identical statistics.
Then: 30,000 samples, DPM-Solver 50 steps, guidance 2.0 (docs/eval.md#text-to-image).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from uvit_cog.captions import CaptionedImageDataset, CaptionedPixels, coco_items, fid_prompts
from uvit_cog.metrics import compute_metrics, frechet_distance, load_statistics
from uvit_cog.rundir import write_text_atomic

STATS_NAME = "fid_stats_mscoco256_val.npz"


def write_prompts(coco: str | Path, out: str | Path, num: int = 30000, seed: int = 0, split: str = "val2014") -> Path:
    """OUT/prompts.txt and OUT/prompts.json of the protocol (`uvit_cog.captions.fid_prompts`)."""
    chosen = fid_prompts(coco_items(coco, split), num, seed)
    for item, k in chosen:
        if "\n" in item.captions[k]:
            raise ValueError(f"{item.path}: caption {k} spans lines; prompts.txt holds one prompt a line")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "prompts.json", json.dumps(
        [{"file": item.path.name, "caption_index": k, "caption": item.captions[k]} for item, k in chosen], indent=0))
    write_text_atomic(out / "prompts.txt", "".join(item.captions[k].strip() + "\n" for item, k in chosen))
    return out / "prompts.txt"


def write_statistics(coco: str | Path, out: str | Path, split: str = "val2014", resolution: int = 256,
                     weights: str = "auto", device: str = "auto", batch_size: int = 50) -> Path:
    """OUT/fid_stats_mscoco256_val.npz: (mu, sigma) of every image of `split`, prepared as U-ViT's MS-COCO data."""
    images = CaptionedPixels(CaptionedImageDataset.from_coco(coco, split, resolution))
    path = Path(out) / STATS_NAME
    compute_metrics(images, metrics=(), weights=weights, device=device, batch_size=batch_size, save_stats=path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prompts = commands.add_parser("prompts", help="one caption each of N distinct images")
    stats = commands.add_parser("stats", help="reference statistics of the split's images at 256x256")
    for sub in (prompts, stats):
        sub.add_argument("--coco", required=True, help="MS-COCO as downloaded (val2014/, annotations/)")
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--split", default="val2014")
    prompts.add_argument("--num", type=int, default=30000, help="prompts: distinct images, one caption each")
    prompts.add_argument("--seed", type=int, default=0)
    stats.add_argument("--weights", default="auto", help="Inception weights: auto | offline | download | path")
    stats.add_argument("--device", default="auto")
    stats.add_argument("--batch-size", type=int, default=50)
    compare = commands.add_parser("compare", help="the FID between two statistics files")
    compare.add_argument("a")
    compare.add_argument("b")
    args = parser.parse_args()
    if args.command == "prompts":
        print(f"wrote {write_prompts(args.coco, args.out, args.num, args.seed, args.split)}")
    elif args.command == "stats":
        path = write_statistics(args.coco, args.out, args.split, 256, args.weights, args.device, args.batch_size)
        print(f"wrote {path}")
    else:
        a, b = load_statistics(args.a), load_statistics(args.b)
        print(f"FID({args.a}, {args.b}) = {frechet_distance(a.mu, a.sigma, b.mu, b.sigma):.6g}")


if __name__ == "__main__":
    main()
