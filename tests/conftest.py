"""Fixtures shared by several test modules."""

from pathlib import Path

import numpy as np
import pytest

from uvit_cog.data import load_npz_arrays

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory) -> Path:
    """The first 256 real MNIST training digits (grayscale NHW) from ../shared/data/mnist.npz, as a small .npz."""
    x, y = load_npz_arrays(DATA / "mnist.npz")
    path = tmp_path_factory.mktemp("npz") / "mnist256.npz"
    np.savez(path, x_train=x[:256], y_train=y[:256])
    return path
