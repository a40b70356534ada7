"""Shared test helpers: configs, small IDX files written on the fly, the real MNIST when present."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import ml_collections
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "mnist"


def load_config(name: str = "default", variant: str | None = None) -> ml_collections.ConfigDict:
    """An experiments/ config, as `--config=experiments/<name>.py[:variant]` would load it."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of uint8 images (N, 28, 28[, 1]) or labels (N,)."""
    array = np.asarray(array, np.uint8)
    if array.ndim == 4:
        array = array[..., 0]
    dims = array.shape
    magic = magic if magic is not None else 0x0800 + len(dims)
    header = np.array([magic, *dims], ">u4").tobytes()
    return header + array.tobytes()


def write_idx(path: os.PathLike, array: np.ndarray, gz: bool = False, **kwargs) -> pathlib.Path:
    path = pathlib.Path(str(path) + (".gz" if gz else ""))
    data = idx_bytes(array, **kwargs)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class c lights up a block at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, (n, 28, 28, 1), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
        images[i, r:r + 8, col:col + 4] = 255
    return images, labels.astype(np.int32)


def write_idx_dir(directory: pathlib.Path, n_train: int = 256, n_test: int = 64,
                  gz: bool = True, seed: int = 0) -> pathlib.Path:
    """A directory of the four MNIST IDX files holding synthetic digits."""
    directory.mkdir(parents=True, exist_ok=True)
    train, test = synthetic_digits(n_train, seed), synthetic_digits(n_test, seed + 1)
    write_idx(directory / "train-images-idx3-ubyte", train[0], gz)
    write_idx(directory / "train-labels-idx1-ubyte", train[1], gz)
    write_idx(directory / "t10k-images-idx3-ubyte", test[0], gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", test[1], gz)
    return directory


@pytest.fixture
def idx_dir(tmp_path) -> pathlib.Path:
    return write_idx_dir(tmp_path / "mnist")


@pytest.fixture
def shared_mnist() -> pathlib.Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("../shared/mnist (the full MNIST) is not present")
    return SHARED_MNIST
