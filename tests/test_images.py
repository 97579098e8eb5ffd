"""Image sources (uvit_cog.images): the one .npz syntax, files that are not .npz archives, image decoding of
every PIL mode a data set meets, and the two folder layouts with their faults."""

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uvit_cog.images import (
    IMAGE_EXTENSIONS,
    class_folder_items,
    flat_folder_files,
    image_source_kind,
    load_images,
    load_npz_arrays,
    open_rgb,
    split_npz_spec,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_one_npz_syntax_and_its_defaults(tmp_path):
    x, y = RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.arange(4)
    np.savez(tmp_path / "keras.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    np.savez(tmp_path / "adm.npz", arr_0=x, arr_1=y)
    np.savez(tmp_path / "only.npz", images=x[:3], note=np.arange(2))
    assert split_npz_spec(f"{tmp_path}/keras.npz:x_test") == (tmp_path / "keras.npz", "x_test")
    assert split_npz_spec("C:/data/a.png") == (Path("C:/data/a.png"), None)  # a colon that is not a key

    images, labels = load_npz_arrays(f"{tmp_path}/keras.npz:x_test")
    assert len(images) == 2 and labels.tolist() == [0, 1]  # labels: y_S beside x_S
    assert load_npz_arrays(tmp_path / "keras.npz")[0].shape == (4, 8, 8, 3)  # default: x_train
    assert load_npz_arrays(tmp_path / "keras.npz", split="test")[1].tolist() == [0, 1]  # older spelling
    assert len(load_npz_arrays(f"{tmp_path}/keras.npz:x_train", split="test")[0]) == 4  # the path's key wins
    assert load_npz_arrays(tmp_path / "adm.npz", split="test")[1].tolist() == y.tolist()  # arr_0 / arr_1
    images, labels = load_npz_arrays(tmp_path / "only.npz")
    assert len(images) == 3 and labels is None  # the only image array, unlabelled

    with pytest.raises(ValueError, match="no array 'x_val'"):
        load_npz_arrays(f"{tmp_path}/keras.npz:x_val")
    with pytest.raises(ValueError, match="expected x_val"):
        load_npz_arrays(tmp_path / "keras.npz", split="val")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(ValueError, match="two.npz:KEY"):
        load_npz_arrays(tmp_path / "two.npz")
    np.savez(tmp_path / "badlabels.npz", x_train=x, y_train=np.zeros(3))
    with pytest.raises(ValueError, match="y_train: labels must be 4 integers"):
        load_npz_arrays(tmp_path / "badlabels.npz")


class Planted:
    """A pickle that, if ever unpickled, writes a file: the proof that no pickle is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle executed"))


@pytest.mark.parametrize("kind", ["text", "pickle", "npy", "zip of junk", "object array"])
def test_files_that_are_not_npz_are_refused_naming_the_path(tmp_path, kind):
    marker, path = tmp_path / "executed", tmp_path / "data.npz"
    if kind == "text":
        path.write_text("x_train,y_train\n1,2\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Planted(marker)))
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), np.zeros((2, 4, 4, 3), np.uint8))
        path.with_suffix(".npy").rename(path)
    elif kind == "zip of junk":
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x_train.npy", b"not an array")
    else:
        np.savez(path, x_train=np.array([Planted(marker)], dtype=object))
    with pytest.raises(ValueError, match=str(path)) as error:
        load_npz_arrays(path)
    assert "allow_pickle" not in str(error.value).split("(")[0]  # our message first, not numpy's
    assert not marker.exists()


def test_open_rgb_converts_every_mode(tmp_path):
    cases = {
        "rgb.png": Image.fromarray(RGB),
        "rgba.png": Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)]), "RGBA"),
        "cmyk.tif": Image.fromarray(RGB).convert("CMYK"),
        "palette.png": Image.fromarray(RGB).quantize(256, dither=Image.Dither.NONE),
        "gray.png": Image.fromarray(RGB[..., 0]),
        "la.png": Image.fromarray(RGB[..., 0]).convert("LA"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    for name in ("rgb.png", "rgba.png", "cmyk.tif"):  # alpha dropped; CMYK made without black converts back
        np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / name)), RGB, err_msg=name)
    gray = np.repeat(RGB[..., :1], 3, axis=-1)
    for name in ("gray.png", "la.png"):
        np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / name)), gray, err_msg=name)
    palette = np.asarray(open_rgb(tmp_path / "palette.png")).astype(int)
    assert palette.shape == RGB.shape and np.abs(palette - RGB).mean() < 8  # quantised, close


def test_open_rgb_scales_sixteen_bit_images(tmp_path):
    gray16 = (np.arange(30).reshape(6, 5) * 2000).astype(np.uint16)  # 0 .. 58000
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    Image.fromarray(gray16).save(tmp_path / "gray16.tif")
    rgb16 = RNG.integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(png16(rgb16))
    expected = np.repeat(np.round(gray16 / 257).astype(np.uint8)[..., None], 3, axis=-1)
    for name in ("gray16.png", "gray16.tif"):
        assert Image.open(tmp_path / name).mode == "I;16"
        got = np.asarray(open_rgb(tmp_path / name))
        np.testing.assert_array_equal(got, expected, err_msg=name)  # PIL's convert("RGB") alone gives all 255
    got = np.asarray(open_rgb(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got - rgb16 / 257).max() <= 1
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif: floating-point image"):
        open_rgb(tmp_path / "float.tif")


@pytest.mark.parametrize("fault", ["truncated png", "truncated jpeg", "random bytes", "empty file"])
def test_undecodable_files_are_named(tmp_path, fault):
    fmt = "JPEG" if "jpeg" in fault else "PNG"
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt)
    data = {"random bytes": RNG.bytes(500), "empty file": b""}.get(fault, buffer.getvalue()[: buffer.tell() // 2])
    path = tmp_path / f"bad.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(OSError, match=f"{path}: cannot decode this image"):
        open_rgb(path)


def test_flat_folder_one_extension_list_hidden_files_and_faults(tmp_path):
    assert ".tif" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.fromarray(RGB).save(folder / "a.png")
    Image.fromarray(RGB).save(folder / "b.TIF")
    Image.fromarray(RGB).save(folder / "c.jpg")
    (folder / "._a.png").write_bytes(b"macOS metadata")  # hidden litter, skipped
    (folder / ".tmp_d.png.123").write_bytes(b"an interrupted atomic write")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    Image.fromarray(RGB).save(folder / "sub" / "e.png")  # flat: not recursive
    assert [p.name for p in flat_folder_files(folder)] == ["a.png", "b.TIF", "c.jpg"]
    images = load_images(folder)
    assert len(images) == 3 and tuple(images[1].shape) == (3, 6, 5)
    np.testing.assert_array_equal(images[1].permute(1, 2, 0).numpy(), RGB)
    assert image_source_kind(folder) == "folder"

    (folder / "z.png").write_bytes(RNG.bytes(100))  # corrupt: its header is read when sizes are checked
    with pytest.raises(OSError, match="z.png: cannot decode"):
        flat_folder_files(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        flat_folder_files(tmp_path / "empty")


def test_class_folder_layout_and_faults(tmp_path):
    root = tmp_path / "train"
    for name in ("dog", "cat", ".ipynb_checkpoints"):
        (root / name / "deep").mkdir(parents=True)
        Image.fromarray(RGB).save(root / name / "deep" / "1.png")
    Image.fromarray(RGB).save(root / "cat" / "0.webp")
    classes, items = class_folder_items(root)
    assert classes == ["cat", "dog"]  # hidden folders are not classes
    assert [(p.relative_to(root).as_posix(), y) for p, y in items] == [
        ("cat/0.webp", 0), ("cat/deep/1.png", 0), ("dog/deep/1.png", 1)
    ]  # fmt: skip
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\]"):
        class_folder_items(root)
    (tmp_path / "flat").mkdir()
    Image.fromarray(RGB).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        class_folder_items(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="missing"):
        class_folder_items(tmp_path / "missing")
