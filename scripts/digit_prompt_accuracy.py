"""How often a digits quick-start model draws the digit it is asked for: a number for "the grid shows what each
prompt asks for".

Samples `--per-prompt` images for every caption of the run's `data.caption_templates` × `data.caption_names` (text
models; `quickstart_t2i`) or every class (class models; `quickstart`), and reads each with a logistic-regression
digit classifier fitted on scikit-learn's digits (the quick starts' data; its held-out accuracy is printed, as the
ceiling of this measure). Chance is 10 %.

    python scripts/digit_prompt_accuracy.py runs/quickstart_t2i
    python scripts/digit_prompt_accuracy.py runs/quickstart --guidance 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from uvit_cog import load_pipeline
from uvit_cog.data import load_digits_arrays


def fit_digit_classifier(num_train: int = 1400):
    """Logistic regression on scikit-learn's 8x8 digits (first `num_train`) and its accuracy on the rest."""
    from sklearn.linear_model import LogisticRegression

    images, labels = load_digits_arrays()
    x = images.reshape(len(images), -1) / 255.0
    classifier = LogisticRegression(max_iter=5000).fit(x[:num_train], labels[:num_train])
    return classifier, float(classifier.score(x[num_train:], labels[num_train:]))


def read_digits(classifier, images: np.ndarray) -> np.ndarray:
    """The digit the classifier reads in each image (N, H, W[, C], floats in [0, 1], H = W a multiple of 8):
    averaged over channels and over (H/8)² blocks, as the 8x8 digits the classifier knows."""
    x = images.mean(-1) if images.ndim == 4 else images
    n, size = len(x), x.shape[1]
    if size % 8 or x.shape[2] != size:
        raise ValueError(f"images of {x.shape[1:]} pixels: the digit classifier reads square images of 8·k pixels")
    k = size // 8
    return classifier.predict(x.reshape(n, 8, k, 8, k).mean((2, 4)).reshape(n, 64))


def conditions(run: Path, text: bool) -> list[tuple[str | int, int]]:
    """(prompt or class, the digit it asks for): every caption the run was trained on, or every class."""
    if not text:
        return [(k, k) for k in range(10)]
    data = OmegaConf.load(run / "config.yaml").data
    return [(template.format(name), digit) for template in data.caption_templates
            for digit, names in enumerate(data.caption_names) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a quick start's run directory (its pipeline/ and config.yaml)")
    parser.add_argument("--per-prompt", type=int, default=16, help="images per prompt or class (default 16)")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale, diffusers' convention (3.0)")
    parser.add_argument("--steps", type=int, default=100, help="sampler steps (default 100, the quick starts' grids)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.run / "pipeline").is_dir() or not (args.run / "config.yaml").is_file():
        parser.error(f"{args.run} is not a finished run directory (no pipeline/ or config.yaml): train one first")
    if args.per_prompt < 1 or args.steps < 1:
        parser.error("--per-prompt and --steps must be at least 1")

    classifier, ceiling = fit_digit_classifier()
    pipe = load_pipeline(args.run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    text = hasattr(pipe, "encode_prompt")
    accuracies = []
    for i, (condition, digit) in enumerate(conditions(args.run, text)):
        given = {"prompt": [condition] * args.per_prompt} if text else {"class_labels": [condition] * args.per_prompt}
        images = pipe(**given, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                      generator=torch.Generator().manual_seed(args.seed + i)).images
        accuracies.append(float((read_digits(classifier, np.asarray(images)) == digit).mean()))
        print(f"{accuracies[-1]:6.1%}  {condition!r}", flush=True)
    accuracy = float(np.mean(accuracies))
    print(f"digit accuracy {accuracy:.1%} over {len(accuracies)} {'prompts' if text else 'classes'} "
          f"× {args.per_prompt} (chance 10 %; the classifier reads {ceiling:.1%} of held-out real digits)")
    print(json.dumps({"accuracy": accuracy, "classifier_heldout_accuracy": ceiling, "guidance": args.guidance,
                      "steps": args.steps, "per_prompt": args.per_prompt}))


if __name__ == "__main__":
    main()
