"""U-ViT (Bao et al. 2022) as a diffusers model, with any registered attention kind per block (U-ViC: Cog).

The architecture and parameter names follow the official `libs/uvit.py` and `libs/uvit_t2i.py` (baofff/U-ViT)
so that the released checkpoints load with a key-for-key copy: depth//2 in-blocks, a mid-block and depth//2
out-blocks that fuse the matching in-block's output through a long skip (Linear(2D→D) on the concatenation),
over tokens plus a learned position embedding. The condition enters as tokens (`CONDITION_TOKENS`):

    unconditional        [time, patches]
    class-conditional    [label, time, patches]              label_emb: Embedding(num_classes + 1, D)
    text-conditional     [time, text_1 … text_L, patches]    context_embed: Linear(text_dim, D), all L tokens

The network sees the time (t + `timestep_offset`) · `timestep_scale` for diffusers' timestep t: U-ViT's discrete
latent models were trained on the 1-indexed time n = t + 1 (offset 1), its continuous-time models on 999·s for
s ∈ (0, 1] (`uvit_cog.official` converts each); models trained here use offset 0 and scale 1 unless a recipe
matches an official convention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from .attention import Attention, get_attention_kind, make_attention, select_layers
from .conditioning import FIELDS
from .official_configs import official_kwargs

# U-ViT's published sizes (Bao et al. 2022, Table 1). Dataset-specific arguments (sample_size,
# patch_size, in_channels, num_classes, final_conv) are given as overrides or by the configs.
PRESETS: dict[str, dict] = {
    "uvit-small": dict(embed_dim=512, depth=12, num_heads=8),
    "uvit-small-deep": dict(embed_dim=512, depth=16, num_heads=8),
    "uvit-mid": dict(embed_dim=768, depth=16, num_heads=12),
    "uvit-large": dict(embed_dim=1024, depth=20, num_heads=16),
    "uvit-huge": dict(embed_dim=1152, depth=28, num_heads=16),
}
# The MS-COCO text-to-image models (U-ViT's `configs/mscoco_uvit_small.py`, and `depth=16` for S/2-deep): 256²
# images as 32² Stable Diffusion latents, CLIP ViT-L/14's 77 × 768 text features, 1-indexed network time.
_MSCOCO = dict(sample_size=32, patch_size=2, in_channels=4, text_dim=768, num_text_tokens=77, timestep_offset=1)
PRESETS["uvit-small-mscoco"] = {**PRESETS["uvit-small"], **_MSCOCO}
PRESETS["uvit-small-deep-mscoco"] = {**PRESETS["uvit-small-deep"], **_MSCOCO}


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, as in U-ViT and ADM."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; out-blocks first fuse the long skip (U-ViT's `skip_linear`)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, attention_type: str, skip: bool,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn: Attention = make_attention(attention_type, dim, num_heads, qkv_bias, layer_index)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resolve_attention_types(
    attention_type: str,
    softmax_layers: str | Sequence[int],
    attention_layers: Mapping[str, str | Sequence[int]] | None,
    num_blocks: int,
) -> list[str]:
    """The attention kind of every block: `attention_type`, softmax in `softmax_layers`, then `attention_layers`.

    Selections are those of `uvit_cog.attention.select_layers` ("first_last": the first and the last block).
    `attention_layers` maps kinds to block selections and overrides the other two; a block that two of
    its entries claim is an error.
    """
    get_attention_kind(attention_type)
    softmax = select_layers(softmax_layers, num_blocks, "softmax_layers")
    types = ["softmax" if i in softmax else attention_type for i in range(num_blocks)]
    claimed: dict[int, str] = {}
    for kind, selection in (attention_layers or {}).items():
        get_attention_kind(kind)
        for i in select_layers(selection, num_blocks, f"attention_layers[{kind!r}]"):
            if i in claimed:
                raise ValueError(f"attention_layers: block {i} is given both {claimed[i]!r} and {kind!r}")
            claimed[i] = types[i] = kind
    return types


@dataclass(frozen=True)
class ConditionTokens:
    """How one kind of condition enters U-ViT as tokens: the forward argument that carries it, the module that
    embeds it (named as in the official code, so official state dicts load), and where its tokens go."""

    argument: str
    module: str
    before_time: bool  # the official order: a label token precedes the time token, text tokens follow it


# Condition kind (`uvit_cog.conditioning`) -> its tokens. A new kind adds a row here and its embedder in __init__.
CONDITION_TOKENS: dict[str, ConditionTokens] = {
    "class": ConditionTokens(FIELDS["class"], "label_emb", before_time=True),
    "text": ConditionTokens(FIELDS["text"], "context_embed", before_time=False),
}


@dataclass
class UViTModelOutput(BaseOutput):
    """The model's prediction (noise, velocity or sample, as the scheduler config defines), (B, C, H, W)."""

    sample: Tensor


class UViTModel(ModelMixin, ConfigMixin):
    """U-ViT / U-ViC diffusion backbone: unconditional, class-conditional (`num_classes`) or text-conditional
    (`text_dim`, `num_text_tokens`).

    `attention_type="cog"` gives U-ViC: Cog attention in every block except those in
    `softmax_layers` (default: the first in-block and the last out-block, as in the paper). Any
    registered kind (`uvit_cog.attention.ATTENTION_KINDS`) can be the `attention_type`, and
    `attention_layers` gives chosen blocks other kinds, e.g. `{"gated": [3, 4], "softmax": "first_last"}`.
    `num_classes` counts the real classes; label `num_classes` is the null class used for
    classifier-free guidance (the official code's `num_classes` counts it too: 1001 for ImageNet).
    A text-conditional model takes `encoder_hidden_states` (B, num_text_tokens, text_dim), e.g. CLIP's last
    hidden state; its unconditional input is the empty prompt's features (`uvit_cog.text`).

    Example:
        >>> model = UViTModel.from_preset("uvit-small", sample_size=32, patch_size=2)
        >>> model(torch.randn(2, 3, 32, 32), 500).sample.shape
        torch.Size([2, 3, 32, 32])
        >>> t2i = UViTModel.from_preset("uvit-small-mscoco")
        >>> t2i(torch.randn(2, 4, 32, 32), 500, encoder_hidden_states=torch.randn(2, 77, 768)).sample.shape
        torch.Size([2, 4, 32, 32])
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int = 0,
        final_conv: bool = True,
        attention_type: str = "cog",
        softmax_layers: str | list[int] = "first_last",
        attention_layers: Mapping[str, str | list[int]] | None = None,
        id2label: Mapping[int | str, str] | None = None,
        text_dim: int = 0,
        num_text_tokens: int = 77,
        timestep_offset: float = 0,
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        if depth < 2 or depth % 2:
            raise ValueError(f"depth must be an even number >= 2 (in-blocks + out-blocks), got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        if text_dim < 0 or (text_dim and num_text_tokens < 1):
            raise ValueError(f"a text-conditional model needs text_dim > 0 and num_text_tokens >= 1, got text_dim="
                             f"{text_dim}, num_text_tokens={num_text_tokens} (text_dim=0: not text-conditional)")
        if num_classes and text_dim:
            raise ValueError(f"num_classes={num_classes} and text_dim={text_dim}: a model has one condition, classes "
                             "or text; set the other to 0")
        if id2label is not None and len(id2label) != num_classes:
            raise ValueError(f"id2label has {len(id2label)} names but the model has num_classes={num_classes}")
        if id2label is not None:
            # JSON keys are strings: store them so, so that a saved and a fresh config compare equal.
            self.register_to_config(id2label={str(k): str(v) for k, v in id2label.items()})
        if not isinstance(softmax_layers, str):
            self.register_to_config(softmax_layers=[int(i) for i in softmax_layers])  # e.g. a Hydra ListConfig
        if attention_layers is not None:  # plain JSON types, whatever mapping (e.g. a Hydra DictConfig) came in
            plain = {str(kind): sel if isinstance(sel, str) else [int(i) for i in sel]
                     for kind, sel in attention_layers.items()}
            self.register_to_config(attention_layers=plain)

        num_blocks = depth + 1
        types = resolve_attention_types(attention_type, softmax_layers, attention_layers, num_blocks)

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        num_patches = (sample_size // patch_size) ** 2
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        # The condition's embedder, under the official parameter name (`CONDITION_TOKENS`).
        self.condition = "class" if num_classes else "text" if text_dim else None
        condition_tokens = 0
        if self.condition == "class":
            self.label_emb = nn.Embedding(num_classes + 1, embed_dim)
            condition_tokens = 1
        elif self.condition == "text":
            self.context_embed = nn.Linear(text_dim, embed_dim)
            condition_tokens = num_text_tokens
        self.extras = 1 + condition_tokens  # tokens before the patches, dropped from the output
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        half = depth // 2
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.in_blocks = nn.ModuleList(
            [Block(**block, attention_type=types[i], skip=False, layer_index=i) for i in range(half)]
        )
        self.mid_block = Block(**block, attention_type=types[half], skip=False, layer_index=half)
        self.out_blocks = nn.ModuleList(
            [Block(**block, attention_type=types[i], skip=True, layer_index=i) for i in range(half + 1, num_blocks)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_channels)
        self.final_layer = (
            nn.Conv2d(in_channels, in_channels, 3, padding=1) if final_conv else nn.Identity()
        )
        self.gradient_checkpointing = False

        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # U-ViT's initialisation; convolutions and embeddings keep PyTorch's defaults as there.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> list[Block]:
        """All blocks in order: in-blocks, mid-block, out-blocks (how `softmax_layers`, `attention_layers` count)."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    @property
    def attention_types(self) -> list[str]:
        """The attention type of each block, in `blocks` order."""
        return [b.attn.kind.name for b in self.blocks]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UViTModel:
        """Build a published U-ViT size (`uvit-small`, …, `uvit-huge`; `uvit-small-mscoco` and
        `uvit-small-deep-mscoco` are the whole MS-COCO text-to-image models), with any config field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], **config) -> UViTModel:
        """Load a state dict of the official U-ViT (`libs/uvit.py`, `libs/uvit_t2i.py`) or U-ViC (CogAttn's
        `U-ViC/libs/uvit_t2i.py`), e.g. a released checkpoint, into the model the official code builds.

        `config` is the official constructor's kwargs as the official config passes them (`img_size`,
        `in_chans`, `conv`, `num_classes` counting the null class, `clip_dim`, `num_clip_token`, CogAttn's
        `np`, …; `official_kwargs`) or this model's own arguments. The attention is the official model's:
        softmax in every block, or with `np=True` Cog in every block but `in_blocks[0]` and `out_blocks[-1]`;
        an explicit `attention_type` (with `softmax_layers` / `attention_layers`) wins. Shapes are checked
        against the config; missing or unexpected tensors raise.
        """
        model = cls(**official_kwargs(config))
        own = model.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]} "
                "(check num_classes, clip_dim/text_dim, mlp_time_embed, final_conv/conv and depth)"
            )
        wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
                 if tuple(state_dict[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"tensor shapes differ from the config (name, checkpoint, model): {wrong[:5]}")
        model.load_state_dict(dict(state_dict))
        return model

    def _check_inputs(self, sample: Tensor, class_labels: Tensor | None,
                      encoder_hidden_states: Tensor | None) -> None:
        cfg = self.config
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must be (B, {cfg.in_channels}, H, W) for this model, got {tuple(sample.shape)}"
            )
        if sample.shape[-2:] != (cfg.sample_size, cfg.sample_size):
            raise ValueError(
                f"sample is {tuple(sample.shape[-2:])} but the model was built for "
                f"{cfg.sample_size}x{cfg.sample_size} (its position embedding is fixed)"
            )
        if class_labels is not None:
            if self.condition != "class":
                kind = "a text-conditional" if self.condition == "text" else "an unconditional"
                raise ValueError(f"class_labels given to {kind} model (num_classes=0)")
            # Data-dependent check: skipped while tracing (torch.compile) to keep the graph whole.
            if not torch.compiler.is_compiling() and (
                int(class_labels.min()) < 0 or int(class_labels.max()) > cfg.num_classes
            ):
                raise ValueError(
                    f"class label out of range: labels must be in [0, {cfg.num_classes}) or the null "
                    f"label {cfg.num_classes}; got min {int(class_labels.min())}, max {int(class_labels.max())}"
                )
        if self.condition == "text":
            expected = (sample.shape[0], cfg.num_text_tokens, cfg.text_dim)
            if encoder_hidden_states is None:
                raise ValueError(
                    "this text-conditional model needs encoder_hidden_states (B, L, C) = "
                    f"(B, {cfg.num_text_tokens}, {cfg.text_dim}); its unconditional input is the empty prompt's "
                    "features (uvit_cog.text.TextEncoder.encode(['']))")
            if tuple(encoder_hidden_states.shape) != expected:
                raise ValueError(
                    f"encoder_hidden_states is {tuple(encoder_hidden_states.shape)} but this model takes {expected}: "
                    f"{cfg.num_text_tokens} tokens (padded to that length, as CLIP's tokenizer does with "
                    f"padding='max_length') of width {cfg.text_dim} (the text encoder's hidden size)")
        elif encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states given to a model that is not text-conditional (text_dim=0)")

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        class_labels: Tensor | None = None,
        return_dict: bool = True,
        encoder_hidden_states: Tensor | None = None,
    ) -> UViTModelOutput | tuple[Tensor]:
        """Predict from noisy `sample` (B, C, H, W) at `timestep` (number, 0-d or (B,) tensor).

        The condition: `class_labels` (B,) ints in [0, num_classes], where `num_classes` is the null label
        (for a class-conditional model a missing `class_labels` means unconditional: all null labels), or
        `encoder_hidden_states` (B, num_text_tokens, text_dim) for a text-conditional model.
        """
        cfg = self.config
        if self.condition == "class" and class_labels is None:
            class_labels = torch.full((sample.shape[0],), cfg.num_classes, device=sample.device, dtype=torch.long)
        self._check_inputs(sample, class_labels, encoder_hidden_states)
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(1).expand(B) if t.dim() == 0 else t
        if t.shape != (B,):
            raise ValueError(f"timestep must be a number, a 0-d tensor or a ({B},) tensor, got {tuple(t.shape)}")
        if cfg.timestep_offset or cfg.timestep_scale != 1.0:  # the network's own time (module docstring)
            t = (t + cfg.timestep_offset) * cfg.timestep_scale

        x = self.patch_embed(sample)
        time_token = self.time_embed(timestep_embedding(t, cfg.embed_dim).to(x.dtype)).unsqueeze(1)
        tokens = [time_token]
        if self.condition is not None:
            spec = CONDITION_TOKENS[self.condition]
            value = {"class_labels": class_labels, "encoder_hidden_states": encoder_hidden_states}[spec.argument]
            embedded = getattr(self, spec.module)(value.to(x.dtype) if value.is_floating_point() else value)
            embedded = embedded.reshape(B, -1, cfg.embed_dim)
            tokens.insert(0 if spec.before_time else 1, embedded)
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed

        run = self._run_block
        skips = []
        for blk in self.in_blocks:
            x = run(blk, x)
            skips.append(x)
        x = run(self.mid_block, x)
        for blk in self.out_blocks:
            x = run(blk, x, skips.pop())

        x = self.decoder_pred(self.norm(x))[:, self.extras :, :]
        p, c, h = cfg.patch_size, cfg.in_channels, cfg.sample_size // cfg.patch_size
        # Tokens are (p1 p2 C) per patch, as U-ViT's einops unpatchify expects.
        x = x.reshape(B, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, h * p, h * p)
        x = self.final_layer(x)
        return UViTModelOutput(sample=x) if return_dict else (x,)

    def _run_block(self, blk: Block, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(blk, x, skip)
        return blk(x, skip)


__all__ = [
    "UViTModel", "UViTModelOutput", "PRESETS", "CONDITION_TOKENS", "timestep_embedding", "resolve_attention_types",
]
