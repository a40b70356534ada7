"""MNIST as numpy arrays (from IDX files, TFDS or the packaged sample), and which batch comes at
step N.

Every source returns uint8 images (N, 28, 28, 1) and int32 labels, read into memory once (55 MB);
scaling to [0, 1] happens on the device (`models.normalize`). The data order is a function of
(seed, epoch) alone, so a resumed run replays it from the step it stopped at.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import hashlib
import importlib.resources
import os
import socket
import urllib.parse

import numpy as np
from absl import logging

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# The four files of the MNIST distribution, by (split, kind).
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# md5 of the uncompressed canonical files: a flipped byte in a real MNIST copy is caught here.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_SIZES = {"train": 60_000, "test": 10_000}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim.

SOURCES = ("auto", "idx", "tfds", "sample")
HOW_TO_GET_MNIST = (
    "point --config.data_dir (or $MNIST_DATA_DIR) at a directory of the four MNIST IDX files, "
    "or run once with network access so TFDS downloads MNIST"
)


class DataError(ValueError):
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


# ---------------------------------------------------------------------------------------------
# IDX files.


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it ({e}); re-download the file") from None


def parse_idx(data: bytes, kind: str, path: str = "<bytes>") -> np.ndarray:
    """Parses one IDX file's bytes: (N, 28, 28, 1) uint8 images or (N,) int32 labels.

    Checks everything a damaged or wrong file gets wrong: magic number, shape, length, label range.
    """
    magic_expected = IDX_MAGIC[kind]
    header_len = 16 if kind == "images" else 8
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes, shorter than the {header_len}-byte IDX header"
        )
    header = np.frombuffer(data, ">u4", count=header_len // 4)
    magic, count = int(header[0]), int(header[1])
    if magic != magic_expected:
        other = {v: k for k, v in IDX_MAGIC.items()}.get(magic)
        hint = f" (that is an IDX {other} file)" if other else ""
        raise DataError(
            f"{path}: wrong magic number {magic:#010x}{hint}; expected {magic_expected:#010x} "
            f"for IDX {kind}"
        )
    if kind == "images":
        rows, cols = int(header[2]), int(header[3])
        if (rows, cols) != IMAGE_SHAPE[:2]:
            raise DataError(f"{path}: images are {rows}x{cols}; MNIST images are 28x28")
    item_size = 28 * 28 if kind == "images" else 1
    expected_len = header_len + count * item_size
    if len(data) != expected_len:
        state = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise DataError(
            f"{path}: {state}: the header promises {count:,} {kind} ({expected_len:,} bytes) "
            f"but the file has {len(data):,} bytes; re-download it"
        )
    values = np.frombuffer(data, np.uint8, offset=header_len)
    if kind == "images":
        return values.reshape(count, *IMAGE_SHAPE)
    if count and values.max() >= NUM_CLASSES:
        bad = int(np.argmax(values >= NUM_CLASSES))
        raise DataError(
            f"{path}: label {int(values[bad])} at index {bad} is outside 0-9; "
            "the file is corrupt or not MNIST"
        )
    return values.astype(np.int32)


def read_idx(
    path: str, kind: str, mnist_name: str | None = None, verify_checksum: bool = True
) -> np.ndarray:
    """Reads a (possibly gzipped) IDX file.

    When it stands for the MNIST file `mnist_name` and has that file's full size, its bytes must
    also match the canonical md5 (unless `verify_checksum` is off, for other IDX data sets).
    """
    data = _read_bytes(path)
    array = parse_idx(data, kind, path)
    name = mnist_name or os.path.basename(path).removesuffix(".gz")
    canonical_size = MNIST_SIZES["train" if name.startswith("train") else "test"]
    if verify_checksum and name in MNIST_MD5 and len(array) == canonical_size:
        digest = hashlib.md5(data).hexdigest()
        if digest != MNIST_MD5[name]:
            raise DataError(
                f"{path}: md5 {digest} is not the canonical MNIST {MNIST_MD5[name]}: the file is "
                "corrupt (re-download it) or not MNIST (for other IDX data, e.g. Fashion-MNIST, "
                "set --config.verify_checksums=False)"
            )
    return array


def _find_idx_file(data_dir: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise DataError(
        f"{data_dir}: no {name} or {name}.gz; the directory must hold the four MNIST IDX files "
        f"({', '.join(IDX_FILES.values())})"
    )


def _assemble(paths: dict[tuple[str, str], str], verify: bool, source: str) -> Dataset:
    arrays = {key: read_idx(path, key[1], IDX_FILES[key], verify) for key, path in paths.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[split, "images"]), len(arrays[split, "labels"])
        if n_img != n_lab:
            raise DataError(
                f"{paths[split, 'images']}: {n_img:,} images but "
                f"{paths[split, 'labels']} has {n_lab:,} labels; the files do not belong together"
            )
        if n_img == 0:
            raise DataError(f"{paths[split, 'images']}: holds no images")
    return Dataset(
        train_images=arrays["train", "images"],
        train_labels=arrays["train", "labels"],
        test_images=arrays["test", "images"],
        test_labels=arrays["test", "labels"],
        source=source,
    )


def load_idx_dir(data_dir: str, verify_checksums: bool = True) -> Dataset:
    """The four IDX files of a directory, gzipped or not (e.g. an offline copy of MNIST)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: not a directory; {HOW_TO_GET_MNIST}")
    paths = {key: _find_idx_file(data_dir, name) for key, name in IDX_FILES.items()}
    return _assemble(paths, verify_checksums, f"idx ({os.path.abspath(data_dir)})")


# ---------------------------------------------------------------------------------------------
# TFDS: a prepared copy read through tfds.data_source (no TensorFlow), or a download.


def _tfds_data_dir(config_dir: str) -> str | None:
    return config_dir or os.environ.get("TFDS_DATA_DIR") or None  # None: TFDS's own default.


def _tfds_corrupt(data_dir: str | None, e: Exception) -> DataError:
    """One line for a TFDS mnist copy whose metadata or shards TFDS cannot read."""
    reason = (str(e).strip().splitlines() or [""])[-1][:200]
    return DataError(
        f"{data_dir or 'TFDS default data dir'}: the TFDS mnist copy there is corrupt "
        f"({type(e).__name__}: {reason}); delete {os.path.join(_tfds_root(data_dir), 'mnist')} "
        "and prepare it again, or use --config.data_source=idx"
    )


def tfds_prepared(data_dir: str | None) -> bool:
    root = _tfds_root(data_dir)
    if "://" not in root and not glob.glob(os.path.join(root, "mnist", "*", "dataset_info.json")):
        return False  # Asking TFDS would log a warning about a folder that is not there.
    import tensorflow_datasets as tfds

    try:  # A garbage dataset_info.json raises from inside TFDS (a ParseError, ValueError, ...).
        return tfds.builder("mnist", data_dir=data_dir).is_prepared()
    except Exception as e:
        raise _tfds_corrupt(data_dir, e) from None


def load_tfds_prepared(data_dir: str | None) -> Dataset:
    """Reads a prepared TFDS `mnist` with `tfds.data_source`: random access, TensorFlow-free."""
    import tensorflow_datasets as tfds

    where = data_dir or "TFDS's default data dir"
    arrays = {}
    for split in ("train", "test"):
        try:
            source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)
        except NotImplementedError:  # What TFDS raises for "not prepared as array_record".
            raise DataError(
                f"{where}: no TFDS mnist prepared as array_record there (a TFRecord copy needs "
                "TensorFlow to read); use --config.data_source=idx, or let TFDS download MNIST"
            ) from None
        except Exception as e:  # Damaged metadata: TFDS raises many types.
            raise _tfds_corrupt(data_dir, e) from None
        try:
            records = [source[i] for i in range(len(source))]
        except Exception as e:  # array_record raises several types for damaged shards.
            raise DataError(
                f"{where}: TFDS mnist {split} split is unreadable ({type(e).__name__}); delete "
                "its mnist directory and prepare it again"
            ) from None
        if not records:
            raise DataError(f"{where}: TFDS mnist {split} split is empty; prepare it again")
        images = np.stack([r["image"] for r in records]).astype(np.uint8)
        labels = np.asarray([r["label"] for r in records], np.int32)
        if images.shape[1:] != IMAGE_SHAPE or labels.max() >= NUM_CLASSES:
            raise DataError(f"{where}: TFDS mnist {split} split does not hold 28x28x1 digits 0-9")
        arrays[split] = images, labels
    return Dataset(*arrays["train"], *arrays["test"], source=f"tfds ({where})")


def _tfds_root(data_dir: str | None) -> str:
    return data_dir or os.path.expanduser("~/tensorflow_datasets")


def downloads_cached(data_dir: str | None) -> bool:
    """Whether an earlier `download_tfds` left all four files in TFDS's download cache."""
    downloads = os.path.join(_tfds_root(data_dir), "downloads")
    return all(glob.glob(os.path.join(downloads, f"*{name}*.gz")) for name in IDX_FILES.values())


def mnist_url() -> str:
    """Where TFDS downloads MNIST from: its mnist builder's URL, or a mirror named in the
    environment (MNIST_FLAX_TFDS_URL) for machines that reach only an internal mirror."""
    import tensorflow_datasets as tfds

    return os.environ.get("MNIST_FLAX_TFDS_URL") or tfds.builder_cls("mnist").URL


def network_available(url: str, timeout_s: float = 3.0) -> bool:
    """Whether `url`'s host accepts a TCP connection within `timeout_s`.

    Decides in seconds where TFDS's own download would retry for minutes with the network down.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def download_tfds(data_dir: str | None, verify_checksums: bool = True) -> Dataset:
    """Downloads the four MNIST files with TFDS's download manager (cached) and reads them.

    TFDS's `mnist` builder cannot *prepare* the dataset without TensorFlow (it reads the files with
    tf.io.gfile), so we use TFDS for what it does without TensorFlow, the cached download, and parse
    the IDX files ourselves; the md5 check above makes that as safe as TFDS's own checksums.
    """
    import tensorflow_datasets as tfds

    root = _tfds_root(data_dir)
    manager = tfds.download.DownloadManager(download_dir=os.path.join(root, "downloads"))
    base = mnist_url()
    urls = {key: urllib.parse.urljoin(base, name + ".gz") for key, name in IDX_FILES.items()}
    try:
        paths = manager.download({"/".join(k): u for k, u in urls.items()})
    except Exception as e:  # requests/TFDS raise many types; all mean the same thing here.
        raise DataError(f"downloading MNIST from {base} failed ({type(e).__name__}); "
                        f"{HOW_TO_GET_MNIST}") from None
    local = {key: os.fspath(paths["/".join(key)]) for key in IDX_FILES}
    return _assemble(local, verify_checksums, f"tfds download ({base} -> {root}/downloads)")


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Choosing a source.


def load_dataset(config) -> Dataset:
    """Loads the source named by `config.data_source`; 'auto' takes the best one available."""
    source = config.data_source
    if source not in SOURCES:
        raise DataError(f"--config.data_source={source!r} is not one of {', '.join(SOURCES)}")
    data_dir = config.data_dir or os.environ.get("MNIST_DATA_DIR", "")
    tfds_dir = _tfds_data_dir(config.tfds_data_dir)

    if source == "idx":
        if not data_dir:
            raise DataError("--config.data_source=idx needs --config.data_dir or $MNIST_DATA_DIR")
        return load_idx_dir(data_dir, config.verify_checksums)
    if source == "sample":
        return load_packaged_sample()
    if source == "tfds":
        if tfds_prepared(tfds_dir) or not (downloads_cached(tfds_dir)
                                           or network_available(mnist_url())):
            return load_tfds_prepared(tfds_dir)
        return download_tfds(tfds_dir, config.verify_checksums)

    # auto
    if data_dir:
        return load_idx_dir(data_dir, config.verify_checksums)
    if tfds_prepared(tfds_dir):
        return load_tfds_prepared(tfds_dir)
    if downloads_cached(tfds_dir) or network_available(mnist_url()):
        return download_tfds(tfds_dir, config.verify_checksums)
    dataset = load_packaged_sample()
    logging.warning(
        "\n%s\nNO FULL MNIST FOUND AND NO NETWORK: training on the PACKAGED SAMPLE of real MNIST "
        "digits (%s train / %s test images).\n"
        "Expect lower accuracy than on the full 60,000/10,000. To use the full set, %s.\n%s",
        "=" * 100, f"{len(dataset.train_labels):,}", f"{len(dataset.test_labels):,}",
        HOW_TO_GET_MNIST, "=" * 100,
    )
    return dataset


# ---------------------------------------------------------------------------------------------
# Which batch comes at step N.


@functools.lru_cache(maxsize=2)  # The loop asks once per step; an epoch's order is computed once.
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch `epoch`: a function of (seed, epoch) alone; a resumed run replays it."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # Cached: shared by every caller.
    return order


def batch_at(dataset: Dataset, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The global training batch of `step`: uint8 images and labels, scaled on the device.

    Each epoch has len(train) // batch_size steps in a fresh order; the partial last batch is
    dropped (the next epoch's order differs, so every image is still seen).
    """
    steps_per_epoch = len(dataset.train_labels) // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    order = epoch_permutation(seed, epoch, len(dataset.train_labels))
    idx = order[index * batch_size:(index + 1) * batch_size]
    return {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}


def gather_batch(data: dict, order, index, batch_size: int, sharding=None) -> dict:
    """`batch_at` on the device: batch `index` of the epoch whose order is `order`.

    `data` is the training split as (replicated) jax arrays and `order` that epoch's
    `epoch_permutation`; called inside a jit, with `index` traced. With `sharding` (the batch
    axis) each device gathers only its own rows from its own copy of the data: no host work.
    """
    import jax  # Here, not at the top: the rest of this module is numpy only.

    idx = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
    if sharding is not None:
        idx = jax.lax.with_sharding_constraint(idx, sharding)
    return {k: jax.numpy.take(v, idx, axis=0, mode="clip") for k, v in data.items()}
