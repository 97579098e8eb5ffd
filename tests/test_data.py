"""Datasets: .npz arrays, class folders and their faults, digits, VAE latents, the global batch sampler."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import load_script, make_image_folder, tiny_vae_dir
from diffusers import AutoencoderKL
from PIL import Image

from uvit_cog.data import (
    ArrayDataset,
    ClassFolderDataset,
    GlobalBatchSampler,
    LatentDataset,
    build_dataset,
    sample_latents,
    shard_paths,
)
from uvit_cog.images import load_npz_arrays


def test_npz_grayscale_becomes_one_channel_resized(mnist_npz):
    ds = build_dataset(dict(kind="npz", path=mnist_npz, resolution=16, channels=1, num_classes=10))
    x, y = ds[3]["x"], ds[3]["class_labels"]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) < -0.9 and 0.5 < float(x.max()) <= 1.0  # ink and background
    raw_x, raw_y = load_npz_arrays(mnist_npz)
    assert int(y) == int(raw_y[3])
    assert len(ds) == 256


def test_npz_adm_layout_and_unlabelled(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=images)
    ds = build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", resolution=8, channels=3, num_classes=0))
    item = ds[2]
    assert torch.equal(item["x"], torch.from_numpy(images[2]).permute(2, 0, 1).float() / 127.5 - 1)
    assert "class_labels" not in item and ds.num_classes == 0  # unlabelled: no label field
    with pytest.raises(ValueError, match="data.num_classes=0"):
        build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", resolution=8, channels=3, num_classes=10))
    with pytest.raises(ValueError, match="data.channels=3"):
        build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", resolution=8, channels=1, num_classes=0))
    # conf/data/npz.yaml's split: train on an ADM file reads arr_0, as before.
    assert len(build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", split="train", resolution=8, channels=3,
                                  num_classes=0))) == 5  # fmt: skip
    # The one syntax FILE.npz:KEY; without it, the file's only image array.
    np.savez(tmp_path / "odd.npz", images=images, more=images[:2])
    ds = build_dataset(dict(kind="npz", path=f"{tmp_path / 'odd.npz'}:more", resolution=8, channels=3, num_classes=0))
    assert len(ds) == 2
    with pytest.raises(ValueError, match="odd.npz:KEY"):
        build_dataset(dict(kind="npz", path=tmp_path / "odd.npz", resolution=8, channels=3, num_classes=0))
    with pytest.raises(ValueError, match="x_train"):
        build_dataset(dict(kind="npz", path=tmp_path / "odd.npz", split="train", resolution=8, channels=3,
                           num_classes=0))  # fmt: skip


def test_digits_ship_with_scikit_learn():
    ds = build_dataset(dict(kind="digits", resolution=16, channels=1, num_classes=10, max_images=None))
    assert len(ds) == 1797 and ds.num_classes == 10
    assert ds[0]["x"].shape == (1, 16, 16)


def test_image_folder_center_crops_to_resolution(tmp_path):
    root = make_image_folder(tmp_path / "train")
    ds = ClassFolderDataset(root, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]["x"], ds[4]["class_labels"]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="data.num_classes=2"):
        build_dataset(dict(kind="folder", root=root, resolution=16, channels=3, num_classes=1000))


def test_global_batch_sampler_is_independent_of_processes_and_restarts():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(GlobalBatchSampler(10, 4, 0, 1, seed=3), 4 * 6)
    ranks = [take(GlobalBatchSampler(10, 4, r, 2, seed=3), 2 * 6) for r in range(2)]
    # Global batch b = rank 0's slice of it, then rank 1's.
    merged = [i for b in range(6) for r in range(2) for i in ranks[r][2 * b : 2 * b + 2]]
    assert merged == single
    assert sorted(single[:10]) == list(range(10)) and sorted(single[10:20]) == list(range(10))  # epochs
    assert single[:10] != single[10:20]  # reshuffled each epoch
    assert take(GlobalBatchSampler(10, 4, 0, 1, seed=3, start=8), 8) == single[8:16]  # resume at images seen


def test_extract_latents_then_load(tmp_path):
    extract = load_script("extract_latents")
    root = make_image_folder(tmp_path / "train", per_class=3)
    vae_dir = tiny_vae_dir(tmp_path / "vae")
    out = extract.extract_latents(root, tmp_path / "latents", vae=str(vae_dir), resolution=16, shard_size=4,
                                  batch_size=2, num_loader_workers=0, device="cpu")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_shards"] == 2 and meta["latent_size"] == 8 and meta["latent_channels"] == 4
    ds = LatentDataset(out)
    assert len(ds) == 12  # 6 images and their flips
    assert ds[0]["x"].shape == (8, 8, 8)

    # Shard 0 holds images 0..3, then their flips: the flip's moments are those of the flipped image.
    images = ClassFolderDataset(root, 16)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        want = vae.encode(torch.stack([images[1]["x"], images[1]["x"].flip(-1)])).latent_dist.parameters
    torch.testing.assert_close(ds[1]["x"], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds[5]["x"], want[1], atol=1e-5, rtol=1e-5)
    # shard 1: images 4, 5 (dog), flips
    assert int(ds[5]["class_labels"]) == int(images[1]["class_labels"]) and int(ds[10]["class_labels"]) == 1

    # Resumable: a missing shard is reported, and a rerun writes only that shard.
    kept = shard_paths(out, 0)[0].stat().st_mtime_ns
    for path in shard_paths(out, 1):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="extract_latents.py again"):
        LatentDataset(out)
    extract.extract_latents(root, out, vae=str(vae_dir), resolution=16, shard_size=4, batch_size=2,
                            num_loader_workers=0, device="cpu")
    assert shard_paths(out, 0)[0].stat().st_mtime_ns == kept
    assert len(LatentDataset(out)) == 12
    with pytest.raises(ValueError, match="another extraction"):
        extract.extract_latents(root, out, vae=str(vae_dir), resolution=16, shard_size=3, num_loader_workers=0,
                                device="cpu")


def test_sample_latents_draws_from_the_moments():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), 2 * np.log(0.5))
    eps = torch.randn(2, 4, 3, 3)
    z = sample_latents(torch.cat([mean, logvar], dim=1), 0.18215, eps)
    torch.testing.assert_close(z, (mean + 0.5 * eps) * 0.18215)


def test_array_dataset_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 8, 8, 3), dtype=np.float32), None, 8)
    with pytest.raises(ValueError, match="square"):
        ArrayDataset(np.zeros((2, 8, 6, 3), dtype=np.uint8), None, 8)


class Planted:
    """A pickle that writes a file if it is ever unpickled."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).write_text, (self.marker, "pickle executed"))


@pytest.mark.parametrize("content", ["text", "pickle"])
def test_npz_data_path_that_is_not_an_npz_names_the_path(tmp_path, content):
    path, marker = tmp_path / ("train.txt" if content == "text" else "train.pkl"), tmp_path / "executed"
    if content == "text":
        path.write_text("1,2,3\n")
    else:
        path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match=f"{path}: not an .npz archive") as error:
        build_dataset(dict(kind="npz", path=str(path), resolution=8, channels=3, num_classes=0))
    assert "pickled data" not in str(error.value) and not marker.exists()
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        build_dataset(dict(kind="npz", path=str(tmp_path / "missing.npz"), resolution=8, channels=3, num_classes=0))


COLOUR = (200, 40, 90)


def fault_folder(root):
    """A class folder with one constant-colour image per PIL mode a training set meets, and a small one."""
    (root / "modes").mkdir(parents=True)
    rgb = Image.new("RGB", (24, 20), COLOUR)
    rgb.convert("CMYK").save(root / "modes" / "cmyk.tif")
    Image.merge("RGBA", (*rgb.split(), Image.new("L", rgb.size, 0))).save(root / "modes" / "rgba.png")  # transparent
    rgb.quantize(4).save(root / "modes" / "palette.png")
    Image.new("L", (20, 24), 120).save(root / "modes" / "gray.png")
    Image.fromarray(np.full((20, 20), 30000, np.uint16)).save(root / "modes" / "gray16.png")
    Image.new("RGB", (5, 7), COLOUR).save(root / "modes" / "small.jpg", quality=100)  # smaller than 16x16
    return root


def test_class_folder_converts_every_mode_and_upsamples_small_images(tmp_path):
    ds = build_dataset(dict(kind="folder", root=fault_folder(tmp_path / "train"), resolution=16, channels=3,
                            num_classes=1))  # fmt: skip
    expected = {"cmyk.tif": COLOUR, "rgba.png": COLOUR, "palette.png": COLOUR, "gray.png": (120,) * 3,
                "gray16.png": (round(30000 / 257),) * 3, "small.jpg": COLOUR}  # fmt: skip
    assert sorted(p.name for p, _ in ds.items) == sorted(expected)
    for i, (path, _) in enumerate(ds.items):
        x = ds[i]["x"]
        assert x.shape == (3, 16, 16), path.name
        want = torch.tensor(expected[path.name], dtype=torch.float32).div(127.5).sub(1).view(3, 1, 1)
        tolerance = 3 / 127.5 if path.suffix == ".jpg" else 1e-6
        assert (x - want).abs().max() <= tolerance, path.name


@pytest.mark.parametrize("fault", ["truncated", "corrupt"])
def test_class_folder_stops_at_an_undecodable_file_naming_it(tmp_path, fault):
    root = make_image_folder(tmp_path / "train", per_class=2)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2] if fault == "truncated" else b"\x89PNG junk" * 10
    (root / "dog" / "9.png").write_bytes(data)
    ds = ClassFolderDataset(root, 16)
    assert ds[0]["x"].shape == (3, 16, 16)  # the intact images still load
    with pytest.raises(OSError, match="dog/9.png: cannot decode this image"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))


def test_class_folder_empty_cases_are_stopped(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        build_dataset(dict(kind="folder", root=tmp_path / "empty", resolution=16, channels=3, num_classes=0))
    root = make_image_folder(tmp_path / "train", per_class=1)
    (root / "emu").mkdir()
    with pytest.raises(ValueError, match=r"\['emu'\]"):
        build_dataset(dict(kind="folder", root=root, resolution=16, channels=3, num_classes=3))
