"""Captioned image sources: MS-COCO as downloaded, metadata.jsonl folders, U-ViT's MS-COCO preprocessing."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import make_captioned_folder, make_coco_fixture
from PIL import Image
from torch.utils.data import DataLoader

from uvit_cog.captions import CaptionedImageDataset, center_square_crop, coco_items, collate_captioned, folder_items
from uvit_cog.images import open_rgb


def official_steps(path, resolution: int) -> np.ndarray:
    """U-ViT's MS-COCO preprocessing written out step by step (datasets.py: `MSCOCODatabase.__getitem__` and
    `center_crop`): RGB array, rows and columns [(n - crop) // 2, (n + crop) // 2) with crop = min(H, W),
    LANCZOS resize, x / 127.5 - 1 in float32, HWC -> CHW."""
    array = np.array(Image.open(path).convert("RGB")).astype(np.uint8)
    crop = min(array.shape[:2])
    h, w = array.shape[:2]
    array = array[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
    array = np.array(Image.fromarray(array, "RGB").resize((resolution, resolution), Image.LANCZOS)).astype(np.uint8)
    return (array.astype(np.float32) / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (41, 40), (33, 33), (200, 57)])
def test_center_square_crop_is_the_official_preprocessing(tmp_path, size):
    # Odd and even differences of the sides, portrait and landscape, square, and a downscale by more than 2.
    rng = np.random.default_rng(sum(size))
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    fixture = make_coco_fixture(tmp_path / "coco", sizes=(1, 1), uncaptioned=0)
    name = fixture.items["train2014"][0][0]
    path.replace(tmp_path / "coco" / "train2014" / name)  # one image of the chosen size, read by the dataset
    dataset = CaptionedImageDataset.from_coco(tmp_path / "coco", "train2014", 16)
    x = dataset.image(0)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    np.testing.assert_array_equal(x.numpy(), official_steps(tmp_path / "coco" / "train2014" / name, 16))
    crop = center_square_crop(open_rgb(tmp_path / "coco" / "train2014" / name), 16)
    assert crop.dtype == np.uint8 and crop.shape == (16, 16, 3)


def test_coco_items_by_image_id_with_every_caption(tmp_path):
    fixture = make_coco_fixture(tmp_path, sizes=(6, 4), uncaptioned=2)
    for split, expected in fixture.items.items():
        with pytest.warns(UserWarning, match=f"skipped 2 image\\(s\\) of {len(expected) + 2} without captions"):
            items = coco_items(tmp_path, split)
        assert [(p.name, c) for p, c in items] == expected
        assert all(p.parent == tmp_path / split for p, _ in items)
    assert {len(c) for _, c in fixture.items["train2014"] + fixture.items["val2014"]} - set(range(1, 8)) == set()
    # The fixture's files are out of id order, and so are its annotations: the reader sorted them.
    data = json.loads((tmp_path / "annotations" / "captions_train2014.json").read_text())
    assert [im["id"] for im in data["images"]] != sorted(im["id"] for im in data["images"])


def test_coco_dataset_items(tmp_path):
    fixture = make_coco_fixture(tmp_path, sizes=(3, 2), uncaptioned=0)
    dataset = CaptionedImageDataset.from_coco(tmp_path, "val2014", 8)
    assert len(dataset) == 2 and (dataset.num_classes, dataset.channels, dataset.resolution) == (0, 3, 8)
    item = dataset[1]
    assert item["captions"] == fixture.items["val2014"][1][1] == dataset.captions(1)
    assert torch.equal(item["x"], dataset.image(1)) and -1.0 <= float(item["x"].min()) <= float(item["x"].max()) <= 1
    dataset.captions(1).append("changed")  # a copy: the dataset keeps its captions
    assert dataset.captions(1) == fixture.items["val2014"][1][1]


def test_coco_faults_are_named_before_any_image_is_read(tmp_path):
    make_coco_fixture(tmp_path, sizes=(3, 2), uncaptioned=0)
    with pytest.raises(FileNotFoundError, match="captions_test2014.json"):
        coco_items(tmp_path, "test2014")
    ann_file = tmp_path / "annotations" / "captions_train2014.json"
    data = json.loads(ann_file.read_text())
    gone = data["images"][1]["file_name"]
    (tmp_path / "train2014" / gone).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of 3 captioned image\\(s\\) not found: .*{gone}"):
        coco_items(tmp_path, "train2014")

    def broken(change) -> str:
        bad = json.loads(json.dumps(data))
        change(bad)
        ann_file.write_text(json.dumps(bad))
        with pytest.raises(ValueError) as error:
            coco_items(tmp_path, "train2014")
        return str(error.value)

    assert "caption '  ' is not a non-empty string" in broken(lambda d: d["annotations"][0].update(caption="  "))
    assert "lacks 'image_id' or 'caption'" in broken(lambda d: d["annotations"][2].pop("caption"))
    assert "lacks 'id' or 'file_name'" in broken(lambda d: d["images"][0].pop("file_name"))
    assert "appears twice" in broken(lambda d: d["images"].append(dict(d["images"][0])))
    assert "'images' and 'annotations'" in broken(lambda d: d.pop("images"))
    ann_file.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        coco_items(tmp_path, "train2014")


def test_folder_items_in_line_order_with_subfolders_and_lists(tmp_path):
    fixture = make_captioned_folder(tmp_path, count=7, unlisted=2)
    with pytest.warns(UserWarning, match="skipped 2 image\\(s\\) that metadata.jsonl does not name"):
        items = folder_items(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in items] == fixture.items
    assert any(len(c) > 1 for _, c in items) and any("/" in name for name, _ in fixture.items)
    # Every PIL mode of the fixture (grayscale, RGBA, palette) comes out as RGB at the resolution.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CaptionedImageDataset.from_folder(tmp_path, 12)
    assert {Image.open(p).mode for p, _ in items} >= {"L", "RGBA", "P"}
    assert all(dataset.image(i).shape == (3, 12, 12) for i in range(len(dataset)))


def test_folder_lines_naming_one_file_add_captions(tmp_path):
    make_captioned_folder(tmp_path, count=2, unlisted=0)
    lines = [{"file_name": "0000.png", "text": "one"}, {"file_name": "more/0001.jpg", "text": ["two", "three"]},
             {"file_name": "./0000.png", "text": "four"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    items = folder_items(tmp_path)
    assert [c for _, c in items] == [["one", "four"], ["two", "three"]]


@pytest.mark.parametrize("line, error, message", [
    ('{"file_name": "0000.png", "text": "a cat"', ValueError, "metadata.jsonl:2: not a JSON object"),
    ('["0000.png", "a cat"]', ValueError, "metadata.jsonl:2: needs the keys 'file_name' and 'text', found list"),
    ('{"file_name": "0000.png", "caption": "a"}', ValueError, "2: needs .* found \\['caption', 'file_name'\\]"),
    ('{"file_name": "0000.png", "text": ""}', ValueError, "metadata.jsonl:2: caption '' is not a non-empty"),
    ('{"file_name": "0000.png", "text": []}', ValueError, "metadata.jsonl:2: 'text' is an empty list"),
    ('{"file_name": "0000.png", "text": ["a", null]}', ValueError, "metadata.jsonl:2: caption None"),
    ('{"file_name": "/etc/x.png", "text": "a"}', ValueError, "'/etc/x.png' must be a path relative to"),
    ('{"file_name": "../x.png", "text": "a"}', ValueError, "'../x.png' must be a path relative to"),
    ('{"file_name": "notes.txt", "text": "a"}', ValueError, "without an image extension .*notes.txt"),
    ('{"file_name": "more/9999.png", "text": "a"}', FileNotFoundError, "1 of 2 captioned .* not found: .*9999"),
])  # fmt: skip
def test_folder_faults_name_the_line(tmp_path, line, error, message):
    make_captioned_folder(tmp_path, count=1, unlisted=0)
    (tmp_path / "notes.txt").write_text("not an image")
    first = (tmp_path / "metadata.jsonl").read_text()
    (tmp_path / "metadata.jsonl").write_text(first + line + "\n")
    with pytest.raises(error, match=message):
        folder_items(tmp_path)


def test_folder_without_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found"):
        folder_items(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no lines"):
        folder_items(tmp_path)


def test_batches_keep_every_caption(tmp_path):
    fixture = make_captioned_folder(tmp_path, count=4, unlisted=0)
    dataset = CaptionedImageDataset.from_folder(tmp_path, 8)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_captioned)))
    assert batch["x"].shape == (4, 3, 8, 8) and batch["captions"] == [c for _, c in fixture.items]
    assert torch.equal(batch["x"][2], dataset.image(2))
