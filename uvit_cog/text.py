"""Text encoders: prompts to the features a text-conditional U-ViT takes as `encoder_hidden_states`.

U-ViT's MS-COCO models (and U-ViC) read CLIP ViT-L/14's text model (`openai/clip-vit-large-patch14`) as the
official `libs/clip.py` calls it: the tokenizer truncates and pads every prompt to 77 tokens
(`padding="max_length"`), the model gets no attention mask, and the features are its `last_hidden_state` (after
the final LayerNorm), 77 × 768 per prompt — Stable Diffusion 1.x's `encode_prompt` with `clip_skip=None`. The
unconditional input is the empty prompt's features (`encode_prompts([""])`), not zeros.

Any other `transformers` text encoder works the same way by name or local path (`load_text_encoder`): the
text tower of a CLIP/SigLIP checkpoint, a T5 encoder, or any model whose output has `last_hidden_state`; its
width must be the model's `text_dim` (`check_text_encoder`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import transformers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

CLIP_L14 = "openai/clip-vit-large-patch14"  # U-ViT's text encoder
# Checkpoints that hold more than a text encoder (a text and a vision tower; an encoder-decoder): the class that
# loads only the text encoder from them, by the checkpoint's `model_type`. Any other model type loads with
# AutoModel and must return `last_hidden_state` itself.
TEXT_ENCODER_CLASSES = {
    "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel",
    "t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
}


def load_text_encoder(
    name_or_path: str | os.PathLike, subfolder: str | None = None, dtype: torch.dtype | None = None,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The text encoder and its tokenizer of a `transformers` checkpoint (a hub name or a local folder), in eval
    mode with gradients off (the encoder stays frozen, as in U-ViT).

    `subfolder` reads a diffusers pipeline's layout (`text_encoder/` beside `tokenizer/`: give the pipeline
    folder and subfolder="text_encoder"). Weights load from safetensors only. `kwargs` go to `from_pretrained`
    (e.g. `local_files_only=True`).
    """
    path = os.fspath(name_or_path)
    sub = {"subfolder": subfolder} if subfolder else {}
    config = AutoConfig.from_pretrained(path, **sub, **kwargs)
    cls = getattr(transformers, TEXT_ENCODER_CLASSES.get(config.model_type, "AutoModel"))
    model = cls.from_pretrained(path, **sub, dtype=dtype, use_safetensors=True, **kwargs)
    # diffusers pipelines keep the tokenizer beside the encoder; a plain checkpoint holds both in one folder.
    tokenizer_sub = {"subfolder": "tokenizer"} if subfolder == "text_encoder" else sub
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_sub, **kwargs)
    return model.eval().requires_grad_(False), tokenizer


def text_width(text_encoder: nn.Module) -> int:
    """The width of a text encoder's features (its hidden size; T5's d_model)."""
    config = text_encoder.config
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None:
        raise ValueError(f"cannot tell the feature width of {type(text_encoder).__name__}: its config has neither "
                         "hidden_size nor d_model")
    return int(width)


def check_text_encoder(text_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, text_dim: int,
                       num_text_tokens: int) -> None:
    """Raise, naming both numbers, if the encoder's features cannot be the model's `encoder_hidden_states`."""
    width = text_width(text_encoder)
    if width != text_dim:
        raise ValueError(
            f"the text encoder {type(text_encoder).__name__} gives features of width {width} but the model takes "
            f"text_dim={text_dim}: use the encoder the model was trained with (U-ViT's MS-COCO models: "
            f"{CLIP_L14}, width 768) or a model built with text_dim={width}")
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if positions is not None and num_text_tokens > positions:
        raise ValueError(f"the model takes {num_text_tokens} text tokens but the text encoder "
                         f"{type(text_encoder).__name__} reads at most {positions}")
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no pad token: prompts cannot be padded to "
                         f"{num_text_tokens} tokens")


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int) -> Tensor:
    """Token ids (N, max_length): truncated and padded to `max_length`, as U-ViT's CLIP embedder does."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_length: int, device: torch.device | str | None = None, batch_size: int = 256) -> Tensor:
    """The features (N, max_length, width) of `prompts`: the encoder's `last_hidden_state` over all
    `max_length` padded positions, with no attention mask (U-ViT's settings), in the encoder's dtype."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.200}")
    device = device if device is not None else next(text_encoder.parameters()).device
    ids = tokenize(tokenizer, prompts, max_length)
    if ids.shape[1] != max_length:
        raise ValueError(f"the tokenizer gave {ids.shape[1]} tokens, not {max_length}")
    return torch.cat([text_encoder(input_ids=chunk.to(device)).last_hidden_state for chunk in ids.split(batch_size)])


def byte_level_clip_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIP tokenizer with a small vocabulary made here (nothing to download): every byte of a prompt is a token,
    and each of `words` (ASCII letters and digits) one token of its own through BPE merges, as a trained vocabulary
    would make a frequent word. It lowercases, splits and pads as CLIP's own does. Made for
    `build_random_text_encoder` and for tests."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    alphabet = [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]  # GPT-2's bytes_to_unicode
    tokens = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words if w.isascii() and w.isalnum() and len(w) > 1):
        pieces = [*word[:-1], word[-1] + "</w>"]  # left to right: w, wo, wor, word</w>
        for piece in pieces[1:]:
            merge = (pieces[0], piece)
            if merge not in merges:
                merges.append(merge)
            pieces[0] += piece
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def random_text_encoder_config(width: int, max_length: int, num_layers: int = 2, num_heads: int = 2,
                               tokenizer: CLIPTokenizer | None = None) -> CLIPTextConfig:
    """The config of a small CLIP text model over `tokenizer`'s vocabulary (default `byte_level_clip_tokenizer()`)."""
    tokenizer = tokenizer or byte_level_clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_random_text_encoder(width: int, max_length: int, seed: int = 0, num_layers: int = 2, num_heads: int = 2,
                              words: Sequence[str] = ()) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A randomly initialised, frozen CLIP text model (seeded) with `byte_level_clip_tokenizer(words)`: give the
    words of the training captions, so that each is one token and prompts stay short.

    Where no pretrained encoder can be had (offline machines, the CPU quick start), a frozen random transformer
    still maps each prompt to its own features, which a diffusion model can learn to follow for prompts like the
    ones it was trained on; it knows no language, so it does not generalise to new words as CLIP does. Save it
    with `save_pretrained` and load it back with `load_text_encoder`, like any encoder.
    """
    tokenizer = byte_level_clip_tokenizer(words)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIPTextModel(random_text_encoder_config(width, max_length, num_layers, num_heads, tokenizer))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval().requires_grad_(False), tokenizer


__all__ = ["CLIP_L14", "TEXT_ENCODER_CLASSES", "build_random_text_encoder", "byte_level_clip_tokenizer",
           "check_text_encoder", "encode_prompts", "load_text_encoder", "random_text_encoder_config", "text_width",
           "tokenize"]
