"""MNIST as numpy arrays, from the source the config names, and which batch comes at step N.

Sources are modules of their own, loaded when chosen: `mnist_idx` (the four IDX files),
`mnist_tfds` (TensorFlow Datasets, TensorFlow-free), or the 5,000 digits packaged here. Each gives
uint8 images (N, 28, 28, 1) and int32 labels in memory; the device scales them. The data order is
a function of (seed, epoch) alone, so a resumed run replays it from the step it stopped at.
"""

import dataclasses
import functools
import hashlib
import importlib.resources
import os

import numpy as np
from absl import logging

from mnist_flax import configs

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

MNIST_SIZES = {"train": 60_000, "test": 10_000}

SOURCES = ("auto", "idx", "tfds", "sample")
HOW_TO_GET_MNIST = (
    "point --config.data_dir (or $MNIST_DATA_DIR) at a directory of the four MNIST IDX files, "
    "or run once with network access so TFDS downloads MNIST"
)


class DataError(configs.UserError):
    """Bad or missing data; the message is one line that names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    train_images: np.ndarray  # (N, 28, 28, 1) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, 28, 28, 1) uint8
    test_labels: np.ndarray  # (M,) int32
    source: str  # Which source was used and where, for logs and TensorBoard.

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train_labels):,} train / "
                f"{len(self.test_labels):,} test images")

    def fingerprint(self) -> str:
        """What the run trains on, in 16 hex digits (sha256 of the training images and labels):
        saved with each checkpoint, so a resume on other data is refused."""
        digest = hashlib.sha256()
        for array in (self.train_images, self.train_labels):
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()[:16]


# The packaged sample.

SAMPLE_FILE = "mnist_sample.npz"  # In mnist_flax/data/; its README gives origin and licence.


@functools.cache  # The result never changes.
def load_packaged_sample() -> Dataset:
    """5,000 real MNIST training digits shipped with the package, split 4,000/1,000 by class."""
    with importlib.resources.files("mnist_flax.data").joinpath(SAMPLE_FILE).open("rb") as f:
        arrays = dict(np.load(f))
    return Dataset(
        arrays["train_images"][..., None], arrays["train_labels"].astype(np.int32),
        arrays["test_images"][..., None], arrays["test_labels"].astype(np.int32),
        source="sample (the 5,000 MNIST digits packaged with mnist_flax)",
    )


# Choosing a source.


def load_dataset(config) -> Dataset:
    """Loads the source named by `config.data_source`; 'auto' takes the best one available:
    data_dir (or $MNIST_DATA_DIR), a prepared TFDS copy, a TFDS download, the packaged sample."""
    source = config.data_source
    if source not in SOURCES:
        raise DataError(f"--config.data_source={source!r} is not one of {', '.join(SOURCES)}")
    data_dir = config.data_dir or os.environ.get("MNIST_DATA_DIR", "")
    if source == "sample":
        return load_packaged_sample()
    if source == "idx" or (source == "auto" and data_dir):
        if not data_dir:
            raise DataError("--config.data_source=idx needs --config.data_dir or $MNIST_DATA_DIR")
        from mnist_flax import mnist_idx

        return mnist_idx.load_dir(data_dir, config.verify_checksums)
    from mnist_flax import mnist_tfds

    tfds_dir = config.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None
    dataset = mnist_tfds.load(tfds_dir, config.verify_checksums, required=source == "tfds")
    if dataset is not None:
        return dataset
    dataset = load_packaged_sample()
    logging.warning("\n%s\nNO FULL MNIST FOUND AND NO NETWORK: training on the PACKAGED SAMPLE of "
                    "real MNIST digits (%s).\nExpect lower accuracy than on the full "
                    "60,000/10,000. To use the full set, %s.\n%s", "=" * 100,
                    dataset.describe().split(": ")[1], HOW_TO_GET_MNIST, "=" * 100)
    return dataset


# Which batch comes at step N.


@functools.lru_cache(maxsize=2)  # The loop asks once per step; an epoch's order is computed once.
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch `epoch`: a function of (seed, epoch) alone; a resumed run replays it."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # Cached: shared by every caller.
    return order


def batch_at(dataset: Dataset, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The global training batch of `step`: len(train) // batch_size steps an epoch, each epoch
    in a fresh order (the partial last batch is dropped; the next order differs)."""
    steps_per_epoch = len(dataset.train_labels) // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_permutation(seed, epoch, len(dataset.train_labels))
    idx = order[index * batch_size:(index + 1) * batch_size]
    return {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}


def gather_batch(data: dict, order, index, batch_size: int, sharding=None) -> dict:
    """`batch_at` inside a jit: batch `index` of the epoch whose `epoch_permutation` is `order`,
    from the (replicated) training arrays `data`; with `sharding` (the batch axis) each device
    gathers only its own rows from its own copy: no host work."""
    import jax  # Here, not at the top: the rest of this module is numpy only.

    idx = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
    if sharding is not None:
        idx = jax.lax.with_sharding_constraint(idx, sharding)
    return {k: jax.numpy.take(v, idx, axis=0, mode="clip") for k, v in data.items()}
