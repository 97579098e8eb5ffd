"""DiT (Peebles & Xie 2023) as a backbone: diffusers' `DiTTransformer2DModel`, trained from scratch as DiT was.

diffusers' class is a port made for DiT's released weights. Trained from scratch it differs from DiT in three
ways, which `DiTModel` undoes; blocks, attention processors, forward pass and config keys stay diffusers':

- **One conditioning embedder.** DiT has one timestep MLP and one label table whose sum c conditions every block;
  diffusers gives each block a copy of its own (its conversion script copies DiT's one into each), which trains
  `depth` separate copies and adds (depth − 1) × 2.78 M parameters at XL/2 (750 M instead of DiT's 675 M). Here
  every block calls the first block's embedder, so the parameter counts are DiT's (`DIT_PRESETS`).
- **DiT's initialisation**: adaLN-Zero (each block's modulation and the final layer start at zero, so every
  block starts as the identity), xavier-uniform linear layers (q, k and v with the bound of DiT's fused qkv),
  the patch projection initialised like a linear layer, N(0, 0.02) label table and timestep MLP. diffusers keeps
  PyTorch's defaults, which suits loading weights, not training.
- **Label dropout belongs to the training loop** (`train.condition_dropout`, seeded per global batch): diffusers'
  label embedder drops 10 % of the labels by itself in train mode, with unseeded `torch.rand`. Its null row is
  kept: label `num_embeds_ada_norm` (the number of classes) is the null label, as `UViTModel`'s `num_classes`.

(`norm_eps`, the eps of the LayerNorm before each MLP, also defaults to DiT's 1e-6 instead of diffusers' 1e-5;
the other norms use 1e-6 in both.)

Added: `class_labels=None` means the null label (unconditional sampling of a conditional model);
`num_embeds_ada_norm=0` is an unconditional DiT, whose only label is the null one (c = timestep embedding + one
learned vector); `id2label` (class names for the pipeline); and the attention kind that `set_attention` gave
the model, as the constructor argument `uvit_cog_attention`, so `from_pretrained`, `from_config` (an EMA copy)
and `DiffusionPipeline` loaders all rebuild the saved kind instead of silently computing softmax.

DiT's learned variance (`out_channels = 2 · in_channels`, its `learn_sigma`) is built when asked for, so the
published parameter counts can be reproduced exactly, and the pipeline samples such a model with its ε half;
this toolkit trains with the ε (or v, x0, flow) MSE and fixed-variance samplers, so train.py trains DiT with
`learn_sigma=false` (output channels halved).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# diffusers' pipeline loader finds a custom component's loading method by looking `ModelMixin` up in the module it
# names (here uvit_cog.dit), so a saved pipeline with a DiTModel loads only if the name is importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from torch import Tensor, nn

from .attention import complement
from .processors import CONFIG_KEY, restore_attention, set_attention

# DiT's published sizes (Peebles & Xie 2023, Table 1; `models.py` DiT_models): width, depth, heads and patch.
# With learn_sigma, 1,000 classes and 32x32x4 latents, `DiTModel.num_parameters()` plus the 256 x width entries of
# the fixed sin-cos position table (a parameter, frozen, in DiT's count; a buffer here) are DiT's logged counts:
# S/2 32,963,360; B/2 130,512,416; L/2 458,102,816; XL/2 675,129,632 (tests/test_dit.py).
DIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}
DIT_PRESETS: dict[str, dict] = {
    f"dit-{size}{patch}": dict(hidden_size=width, depth=depth, num_heads=heads, patch_size=patch)
    for size, (width, depth, heads) in DIT_SIZES.items()
    for patch in (2, 4, 8)
}


class SharedEmbedder(nn.Module):
    """Calls another block's conditioning embedder. It is no submodule of this one: the embedder's weights are
    registered (and saved, counted and optimised) once, in the first block."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "embedder", embedder)  # bypasses nn.Module's registration

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.embedder(*args, **kwargs)


class DiTModel(DiTTransformer2DModel):
    """diffusers' `DiTTransformer2DModel` with DiT's shared conditioning, initialisation and label handling.

    Arguments are `DiTTransformer2DModel`'s (`num_embeds_ada_norm` is the number of classes, 0 for an
    unconditional model), plus `id2label` (class id → name) and `uvit_cog_attention`, the record
    `set_attention` writes (`{"kind": ..., "layers": ...}`; None: the model's own softmax attention).
    Build a published size with `build_dit`.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        id2label: Mapping[int | str, str] | None = None,
        uvit_cog_attention: Mapping[str, Any] | None = None,
    ) -> None:
        if num_embeds_ada_norm is None or num_embeds_ada_norm < 0:
            raise ValueError(f"num_embeds_ada_norm (the number of classes) must be >= 0, got {num_embeds_ada_norm}")
        if id2label is not None and len(id2label) != num_embeds_ada_norm:
            raise ValueError(f"id2label has {len(id2label)} names but the model has {num_embeds_ada_norm} classes")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, num_layers=num_layers, dropout=dropout, norm_num_groups=norm_num_groups,
            attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
            activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm, upcast_attention=upcast_attention,
            norm_type=norm_type, norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
        )
        if id2label is not None:  # JSON keys are strings: stored so, a saved and a fresh config compare equal
            self.register_to_config(id2label={str(k): str(v) for k, v in id2label.items()})
        # diffusers reloads keys listed in `_use_default_values` with their defaults: the attention record that
        # set_attention adds after construction must not be one of them.
        defaults = [k for k in self.config.get("_use_default_values", []) if k != CONFIG_KEY]
        self.register_to_config(_use_default_values=defaults)

        embedder = self.transformer_blocks[0].norm1.emb
        embedder.class_embedder.dropout_prob = 0.0  # the table keeps its null row; the training loop drops labels
        for block in self.transformer_blocks[1:]:
            block.norm1.emb = SharedEmbedder(embedder)
        self._init_dit_weights()
        restore_attention(self, {CONFIG_KEY: uvit_cog_attention}, "DiTModel(uvit_cog_attention=...)")

    @torch.no_grad()
    def _init_dit_weights(self) -> None:
        """DiT's `initialize_weights`, on diffusers' module names."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        width = self.inner_dim
        qkv_bound = math.sqrt(6.0 / (width + 3 * width))  # xavier bound of DiT's fused Linear(width, 3·width)
        for block in self.transformer_blocks:
            for linear in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
                nn.init.uniform_(linear.weight, -qkv_bound, qkv_bound)
            nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero
            nn.init.zeros_(block.norm1.linear.bias)
        proj = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        embedder = self.transformer_blocks[0].norm1.emb
        nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        for linear in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def num_classes(self) -> int:
        """Real classes (0 = unconditional); label `num_classes` is the null label."""
        return int(self.config.num_embeds_ada_norm)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | None = None,
        class_labels: Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        encoder_hidden_states: Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """diffusers' DiT forward; `class_labels` (B,) in [0, num_classes], None meaning the null label.

        DiT is class-conditional only: `encoder_hidden_states` (text features) is refused, not ignored.
        """
        if encoder_hidden_states is not None:
            raise ValueError("DiTModel is class-conditional only and takes no encoder_hidden_states (text); use a "
                             "text-conditional UViTModel (text_dim > 0) for text-to-image")
        if class_labels is None:
            class_labels = torch.full((hidden_states.shape[0],), self.num_classes, device=hidden_states.device,
                                      dtype=torch.long)
        # Data-dependent check: skipped while tracing (torch.compile) to keep the graph whole.
        elif not torch.compiler.is_compiling() and (
            int(class_labels.min()) < 0 or int(class_labels.max()) > self.num_classes
        ):
            raise ValueError(f"class label out of range: labels must be in [0, {self.num_classes}) or the null label "
                             f"{self.num_classes}; got min {int(class_labels.min())}, max {int(class_labels.max())}")
        return super().forward(hidden_states, timestep, class_labels, cross_attention_kwargs, return_dict)


def build_dit(
    *,
    hidden_size: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    sample_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = False,
    attention_type: str = "softmax",
    softmax_layers: str | Sequence[int] = "first_last",
    id2label: Mapping[int | str, str] | None = None,
) -> DiTModel:
    """A freshly initialised `DiTModel` in DiT's own terms (`models.py`: hidden_size, depth, num_heads, ...).

    `attention_type` goes into every block but those of `softmax_layers`, as in `UViTModel` (the selections of
    `uvit_cog.attention.select_layers`; default "first_last": U-ViC's choice), placed with `set_attention`.
    "softmax" keeps diffusers' own attention. `learn_sigma` doubles the output channels as DiT's learned variance
    (see the module docstring).
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    model = DiTModel(
        num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels, num_layers=depth, sample_size=sample_size,
        patch_size=patch_size, num_embeds_ada_norm=num_classes, id2label=id2label,
    )
    if attention_type != "softmax":
        selection = softmax_layers if isinstance(softmax_layers, str) else [int(i) for i in softmax_layers]
        set_attention(model, attention_type, complement(selection, depth))
    return model


def dit_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`build_dit`'s arguments from a model description, earlier descriptions included: before `softmax_layers`,
    DiT configs named the blocks that got `attention_type` in `attention_layers`, with "first_last" for every
    block but the first and the last. Such a config builds the same model as before."""
    fields = dict(fields)
    if "attention_layers" in fields:
        if "softmax_layers" in fields:
            raise ValueError("attention_layers (DiT's field before softmax_layers) and softmax_layers are both set: "
                             "keep softmax_layers, the blocks that stay softmax")
        if fields.get("depth") is None:
            raise ValueError("attention_layers (DiT's field before softmax_layers) needs depth, or a preset, to read")
        old = fields.pop("attention_layers")
        got_kind = "all_but_first_last" if old == "first_last" else old
        fields["softmax_layers"] = complement(got_kind, int(fields["depth"]))
    return fields


__all__ = ["DIT_PRESETS", "DiTModel", "SharedEmbedder", "build_dit", "dit_fields"]
