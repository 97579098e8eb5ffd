"""Extension points of docs/extending.md that the rest of the suite reaches only through the built-in entries.

A third backbone registered in `uvit_cog.backbones.BACKBONES` at run time (the way docs/extending.md registers one
from a user's package): its presets and arguments are resolved, a text condition it does not list is refused, the
training loss trains it, and both pipelines' shared loop samples it with guidance, saves it and loads it back. The
backbone below is the smallest that satisfies the contract (a diffusers model whose config has `sample_size`,
`in_channels` and `num_classes`, called as `model(x, t, class_labels=...).sample`), so anything that quietly starts
to assume U-ViT or DiT (`isinstance` branches, their config keys) fails here.
"""

import numpy as np
import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from uvit_cog import UViTPipeline, load_pipeline
from uvit_cog.backbones import BACKBONES, Backbone, backbone_arguments, build_backbone, condition_kind, with_defaults
from uvit_cog.conditioning import null_class_condition
from uvit_cog.model import UViTModelOutput, timestep_embedding
from uvit_cog.objectives import make_objective
from uvit_cog.pipeline import build_pipeline
from uvit_cog.schedule import default_scheduler, scheduler_config
from uvit_cog.training import GlobalBatchRandom, diffusion_loss, prepare_batch

pytestmark = pytest.mark.usefixtures("single_thread")


class PixelMLP(ModelMixin, ConfigMixin):
    """Per-pixel MLP (1x1 convolutions) whose hidden units are shifted by the time and label embeddings."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 3, num_classes: int = 0, width: int = 16) -> None:
        super().__init__()
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp, self.out = nn.Conv2d(in_channels, width, 1), nn.Conv2d(width, in_channels, 1)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(len(sample))
        shift = timestep_embedding(t, self.config.width)
        if self.label_emb is not None:
            if class_labels is None:  # the null label, as the toolkit's backbones read a missing condition
                class_labels = null_class_condition(self.config.num_classes, len(sample), sample.device)["class_labels"]
            shift = shift + self.label_emb(class_labels)
        h = torch.nn.functional.silu(self.inp(sample) + shift.to(sample.dtype)[:, :, None, None])
        return UViTModelOutput(sample=self.out(h))


@pytest.fixture
def pixel_mlp():
    """The backbone registered for one test, and gone after it (the registry is shared by every test)."""
    BACKBONES["pixel_mlp"] = Backbone(build=PixelMLP, presets={"pixel-mlp-s": {"width": 8}},
                                      conditions=("none", "class"))
    yield
    del BACKBONES["pixel_mlp"]


def test_registered_backbone_is_resolved_trained_and_sampled(pixel_mlp, tmp_path):
    fields = {"backbone": "pixel_mlp", "preset": "pixel-mlp-s", "width": None, "sample_size": 8, "in_channels": 1,
              "num_classes": 3}
    name, kwargs = backbone_arguments(fields)
    assert (name, kwargs) == ("pixel_mlp", {"width": 8, "sample_size": 8, "in_channels": 1, "num_classes": 3})
    assert with_defaults(name, {"num_classes": 3}) == {"sample_size": 8, "in_channels": 3, "num_classes": 3,
                                                       "width": 16}
    with pytest.raises(ValueError, match="preset='pixel-mlp-xl' is no pixel_mlp size"):
        backbone_arguments({**fields, "preset": "pixel-mlp-xl"})
    with pytest.raises(ValueError, match=r"backbone=pixel_mlp is not text-conditional \(it takes \('none', 'class'\)"):
        build_backbone(name, **kwargs, text_dim=16)
    torch.manual_seed(0)
    model = build_backbone(name, **kwargs, text_dim=0)  # text_dim=0 ("no text") is dropped for any backbone
    assert condition_kind(model.config) == "class"

    # The training step: batch preparation with condition dropout, then the loss and one optimiser step.
    schedule = scheduler_config("linear", "epsilon")
    objective = make_objective(schedule)
    batch = {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "class_labels": torch.arange(8) % 3}
    rnd = GlobalBatchRandom(0, 0, 0, 8, 8, torch.device("cpu"))
    x0, condition = prepare_batch(batch, rnd, "class", dropout=0.5, null=null_class_condition(3, 1))
    assert set(condition) == {"class_labels"} and (condition["class_labels"] == 3).any()  # some rows dropped
    before = model.out.weight.detach().clone()
    loss = diffusion_loss(model, objective, x0, condition, rnd)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss) and not torch.equal(model.out.weight, before)

    # The pipelines: guidance batches the null label, the pipeline saves and loads back as the same model.
    pipe = build_pipeline(model.eval(), default_scheduler(schedule))
    assert type(pipe) is UViTPipeline and pipe.num_classes == 3
    pipe.set_progress_bar_config(disable=True)

    def images(p):
        return p(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, generator=torch.manual_seed(0),
                 output_type="np").images

    first = images(pipe)
    assert first.shape == (2, 8, 8, 1) and np.isfinite(first).all()
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = load_pipeline(tmp_path / "pipeline")  # this module is imported: diffusers finds PixelMLP in it
    assert type(loaded.transformer) is PixelMLP and loaded.transformer.config.width == 8
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(loaded), first)
