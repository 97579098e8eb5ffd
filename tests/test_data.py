"""Datasets: .npz arrays, image folders, digits, VAE latent extraction and loading, the global batch sampler."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from uvit_cog.data import (
    ArrayDataset,
    GlobalBatchSampler,
    ImageFolderDataset,
    LatentDataset,
    build_dataset,
    load_npz_arrays,
    sample_latents,
    shard_paths,
)

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import a script from scripts/ (not a package) by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, seed: int = 0) -> Path:
    """An ImageNet-layout folder of random RGB images of varied, non-square sizes."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def tiny_vae_dir(path: Path) -> Path:
    """A randomly initialised AutoencoderKL (downsampling by 2, 4 latent channels) saved with save_pretrained."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(path)
    return path


def test_npz_grayscale_becomes_one_channel_resized(mnist_npz):
    ds = build_dataset(dict(kind="npz", path=mnist_npz, resolution=16, channels=1, num_classes=10))
    x, y = ds[3]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) < -0.9 and 0.5 < float(x.max()) <= 1.0  # ink and background
    raw_x, raw_y = load_npz_arrays(mnist_npz)
    assert int(y) == int(raw_y[3])
    assert len(ds) == 256


def test_npz_adm_layout_and_unlabelled(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=images)
    ds = build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", resolution=8, channels=3, num_classes=0))
    x, y = ds[2]
    assert torch.equal(x, torch.from_numpy(images[2]).permute(2, 0, 1).float() / 127.5 - 1)
    assert int(y) == 0 and ds.num_classes == 0
    with pytest.raises(ValueError, match="data.num_classes=0"):
        build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", resolution=8, channels=3, num_classes=10))
    with pytest.raises(ValueError, match="data.channels=3"):
        build_dataset(dict(kind="npz", path=tmp_path / "adm.npz", resolution=8, channels=1, num_classes=0))
    np.savez(tmp_path / "odd.npz", images=images)
    with pytest.raises(ValueError, match="x_train"):
        build_dataset(dict(kind="npz", path=tmp_path / "odd.npz", resolution=8, channels=3, num_classes=0))


def test_digits_ship_with_scikit_learn():
    ds = build_dataset(dict(kind="digits", resolution=16, channels=1, num_classes=10, max_images=None))
    assert len(ds) == 1797 and ds.num_classes == 10
    assert ds[0][0].shape == (1, 16, 16)


def test_image_folder_center_crops_to_resolution(tmp_path):
    root = make_image_folder(tmp_path / "train")
    ds = ImageFolderDataset(root, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
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
    moments, label = ds[0]
    assert moments.shape == (8, 8, 8)

    # Shard 0 holds images 0..3, then their flips: the flip's moments are those of the flipped image.
    images = ImageFolderDataset(root, 16)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        want = vae.encode(torch.stack([images[1][0], images[1][0].flip(-1)])).latent_dist.parameters
    torch.testing.assert_close(ds[1][0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds[5][0], want[1], atol=1e-5, rtol=1e-5)
    assert int(ds[5][1]) == int(images[1][1]) and int(ds[10][1]) == 1  # shard 1: images 4, 5 (dog), flips

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
