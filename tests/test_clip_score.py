"""CLIP score with tiny CLIP models built and saved here (nothing downloads), loaded as a real one would be."""

import numpy as np
import pytest
import torch
from conftest import save_tiny_clip, save_tiny_clip_text, tiny_clip, tiny_clip_processor
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTextModel

from uvit_cog.clip_score import ClipScorer, clip_score

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red bus on a street", "two cats sleeping", "a kite flying near the sea", "an old teapot",
           "a horse in a field"]


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of varied non-square sizes."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(24, 60)), int(rng.integers(24, 60)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


def features(output) -> torch.Tensor:
    """`get_*_features`' projected embeddings: a tensor in transformers 4, the pooler output of a model output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_per_image_values_are_clip_model_cosines(clip_dir):
    images = random_images(5)
    result = clip_score(images, PROMPTS, clip_dir, batch_size=2, device="cpu")
    # By hand with CLIPModel's own feature functions and the processor as torchmetrics calls them (PIL input, text
    # padded to the longest prompt): the scorer pads to 77, which the causal text tower does not see.
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), tiny_clip_processor()
    with torch.no_grad():
        image_emb = features(model.get_image_features(**processor(images=images, return_tensors="pt")))
        text_emb = features(model.get_text_features(**processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")))
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb).double().numpy()
    np.testing.assert_allclose(result.cosine, cosine, rtol=0, atol=1e-6)  # float32 sums in another order
    np.testing.assert_allclose(result.per_image, 100 * np.maximum(cosine, 0), rtol=0, atol=1e-4)
    assert result.mean == pytest.approx(result.per_image.mean(), abs=1e-12) and len(result) == 5
    assert (cosine < 0).any() and (cosine > 0).any()  # a random model: both signs, so the clamp was exercised


def test_a_hand_computable_model_scores_matching_prompts_high(tmp_path):
    """Projections set so that image i's embedding is e_i and prompt i's is a chosen vector: the scores follow
    from the cosines by hand: (1, 0.6, -1) for matching pairs, 0 for every shuffled one."""
    images, prompts = random_images(3, seed=1), PROMPTS[:3]
    model, processor = tiny_clip(), tiny_clip_processor()
    with torch.no_grad():
        pooled_images = model.vision_model(**processor(images=images, return_tensors="pt")).pooler_output
        tokens = processor.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
        pooled_texts = model.text_model(**tokens).pooler_output
    eye = torch.eye(16, dtype=torch.float64)
    image_targets = eye[:3]
    text_targets = torch.stack([eye[0], 0.6 * eye[1] + 0.8 * eye[3], -eye[2]])

    def projection(pooled, targets):  # W with W @ pooled_k = target_k: exact, the pooled vectors are independent
        return (targets.T @ torch.linalg.pinv(pooled.double().T)).float()

    model.visual_projection.weight.data = projection(pooled_images, image_targets)
    model.text_projection.weight.data = projection(pooled_texts, text_targets)
    scorer = ClipScorer.from_pretrained(save_tiny_clip(tmp_path / "clip", model), device="cpu")
    result = scorer.score(images, prompts)
    np.testing.assert_allclose(result.cosine, [1.0, 0.6, -1.0], atol=1e-5)
    np.testing.assert_allclose(result.per_image, [100.0, 60.0, 0.0], atol=1e-3)
    assert result.mean == pytest.approx(160 / 3, abs=1e-3)
    shuffled = scorer.score(images, [prompts[1], prompts[2], prompts[0]])
    np.testing.assert_allclose(shuffled.per_image, [0.0, 0.0, 0.0], atol=1e-3)


def test_batch_size_and_input_kind_do_not_change_scores(clip_dir, tmp_path):
    scorer = ClipScorer.from_pretrained(clip_dir, device="cpu")
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (7, 20, 28, 3), dtype=np.uint8)
    for i, image in enumerate(array):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    prompts = [f"sample number {i}" for i in range(7)]
    reference = scorer.score(array, prompts, batch_size=7)
    for images, batch_size in [(array, 1), (array, 3), (tmp_path, 2), (list(array), 4),
                               ([Image.fromarray(a) for a in array], 7)]:
        result = scorer.score(images, prompts, batch_size=batch_size)
        np.testing.assert_allclose(result.cosine, reference.cosine, rtol=0, atol=1e-6)
    assert len(set(np.round(reference.cosine, 6))) == 7  # distinct pairs: a mix-up of the order would show


def test_prompts_are_cut_to_the_models_context(clip_dir):
    # The tiny tokenizer makes each one-letter word one token: 200 words are 202 tokens, the text tower has 77
    # positions, so the prompt reads as its first 75 words (plus start and end of text).
    scorer = ClipScorer.from_pretrained(clip_dir, device="cpu")
    images = random_images(2, seed=3)
    long, cut = "x " * 200, "x " * 75
    scores = scorer.score(images, [long, "y " * 200])
    np.testing.assert_allclose(scores.cosine[0], scorer.score(images, [cut, "y " * 75]).cosine[0], atol=1e-6)
    assert scorer.score(images, [cut[:-4], "y"]).cosine[0] != pytest.approx(scores.cosine[0], abs=1e-6)


def test_counts_and_types_are_checked_before_the_model_loads(tmp_path):
    images = random_images(3)
    missing_model = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        clip_score(images, PROMPTS[:2], missing_model)
    with pytest.raises(TypeError, match="one string; pass a list of prompts"):
        clip_score(images[:1], "a cat", missing_model)
    with pytest.raises(TypeError, match="prompts\\[1\\] is int"):
        clip_score(images[:2], ["a cat", 3], missing_model)
    with pytest.raises(TypeError, match="one PIL image"):
        clip_score(images[0], ["a cat"], missing_model)
    with pytest.raises(TypeError, match="a Dataset whose items are tuple"):
        clip_score(torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8)), ["a", "b"], missing_model)
    with pytest.raises(ValueError, match="pixels are float32"):
        clip_score(np.zeros((2, 8, 8, 3), np.float32), ["a", "b"], missing_model)


def test_folders_that_are_not_clip_models_are_named(clip_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        ClipScorer.from_pretrained(empty)
    for what in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert what in str(error.value)
    no_tokenizer = tmp_path / "no_tokenizer"
    tiny_clip().save_pretrained(no_tokenizer)
    tiny_clip_processor().image_processor.save_pretrained(no_tokenizer)
    with pytest.raises(FileNotFoundError, match="it lacks the tokenizer \\(tokenizer.json or vocab.json\\)\\."):
        ClipScorer.from_pretrained(no_tokenizer)
    # A diffusers pipeline, and its text encoder saved with a tokenizer and image processor: one tower only.
    pipeline = save_tiny_clip_text(tmp_path / "pipeline")
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="is a diffusers pipeline, not a CLIP model"):
        ClipScorer.from_pretrained(pipeline)
    text_only = pipeline / "text_encoder"
    tiny_clip_processor().image_processor.save_pretrained(text_only)
    tiny_clip_processor().tokenizer.save_pretrained(text_only)
    with pytest.raises(ValueError, match="without a vision tower \\(model_type 'clip_text_model'\\)"):
        ClipScorer.from_pretrained(text_only)
    # A full CLIP config whose weights hold only the text tower: loading would leave the vision tower random.
    partial = tmp_path / "partial"
    save_tiny_clip(partial)
    save_file(CLIPTextModel.from_pretrained(text_only).state_dict(), partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks .* CLIP weights .* which would be random"):
        ClipScorer.from_pretrained(partial)
    with pytest.raises(OSError, match="not a local folder, nor a model found"):
        ClipScorer.from_pretrained(str(tmp_path / "not-there"))
