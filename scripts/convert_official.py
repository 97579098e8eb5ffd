"""Convert a released official U-ViT / U-ViC checkpoint into a pipeline directory, in one command.

    python scripts/convert_official.py --list
    python scripts/convert_official.py --config mscoco_uvit_small --checkpoint mscoco_uvit_small.pth \\
        --vae assets/stable-diffusion/autoencoder_kl.pth --out converted/mscoco_uvit_small
    python scripts/convert_official.py --config cifar10_uvit_small --checkpoint cifar10_uvit_small.pth \\
        --out converted/cifar10_uvit_small

`--config` is the name of the checkpoint's official config (`--list` shows them all with their sampling).
Latent models need `--vae`: U-ViT's `autoencoder_kl.pth` (`autoencoder_kl_ema.pth` for the ImageNet H models, as
their evaluation decodes with) or a diffusers AutoencoderKL folder. MS-COCO models read CLIP ViT-L/14 unless
`--text-encoder` names another copy (a name or a local folder). The directory then samples as the official code
does (docs/official_checkpoints.md): its saved scheduler, and `official.json` with the official steps and guidance.
"""

from __future__ import annotations

import argparse
import sys

from uvit_cog.official import OFFICIAL_CONFIGS, OFFICIAL_SAMPLERS, convert_official, read_official_info
from uvit_cog.text import CLIP_L14


def list_configs() -> str:
    """One line per released checkpoint: name, what it is, and the official sampling in diffusers' terms."""
    lines = []
    for name, c in OFFICIAL_CONFIGS.items():
        space = "pixels" if c.latent_scale is None else f"latents x{c.latent_scale}"
        lines.append(f"{name:30s} {c.description}; {space}; {c.steps} steps of "
                     f"{OFFICIAL_SAMPLERS[c.sampler].scheduler}, g = {c.guidance_scale:.1f}; FID {c.fid}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the official configs and exit")
    parser.add_argument("--config", choices=list(OFFICIAL_CONFIGS), metavar="NAME",
                        help="the checkpoint's official config (see --list)")
    parser.add_argument("--checkpoint", help="the released .pth (a state dict; read weights-only)")
    parser.add_argument("--out", help="the pipeline directory to write (new or empty)")
    parser.add_argument("--vae", help="latent models: U-ViT's autoencoder_kl*.pth or a diffusers AutoencoderKL folder")
    parser.add_argument("--text-encoder", help=f"MS-COCO models: a text encoder name or folder (default {CLIP_L14})")
    args = parser.parse_args(argv)
    if not args.list and not (args.config and args.checkpoint and args.out):
        parser.error("--config, --checkpoint and --out are required (or --list)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_configs())
        return 0
    try:
        out = convert_official(args.checkpoint, args.config, args.out, vae=args.vae, text_encoder=args.text_encoder)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = read_official_info(out)
    print(f"wrote {out}: sample with {info['num_inference_steps']} steps of the saved scheduler and "
          f"guidance_scale={info['guidance_scale']} (the official s = {info['official_guidance_scale']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
