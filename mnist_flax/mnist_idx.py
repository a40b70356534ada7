"""MNIST's own distribution format: the four IDX files (gzipped or not), read and checked.

Each file is checked for everything a damaged or wrong file gets wrong (magic number, shape,
length, label range) and, when it has the canonical size, against MNIST's known md5.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import numpy as np

from mnist_flax.input_pipeline import (
    HOW_TO_GET_MNIST,
    IMAGE_SHAPE,
    MNIST_SIZES,
    NUM_CLASSES,
    DataError,
    Dataset,
)

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
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim.
GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    # A pipe or device would block read() forever (or never end): refuse it before opening.
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "a pipe or device"
        raise DataError(f"{path}: not a regular file ({what}); put the IDX file itself there "
                        "(or a symlink to it)")
    try:  # Gzipped or not by its content (gzip's magic bytes), not its name: `x.gz` may be plain.
        with open(path, "rb") as f:
            data = f.read()
        return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
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
    also match the canonical md5 (unless `verify_checksum` is off, for other IDX data sets); bytes
    with the md5 of another of the four files (train and test swapped) are refused too.
    """
    data = _read_bytes(path)
    array = parse_idx(data, kind, path)
    name = mnist_name or os.path.basename(path).removesuffix(".gz")
    if not verify_checksum or name not in MNIST_MD5 or len(array) not in MNIST_SIZES.values():
        return array
    digest = hashlib.md5(data).hexdigest()
    other = next((n for n, md5 in MNIST_MD5.items() if md5 == digest and n != name), None)
    if other:  # train-* and t10k-* swapped would train on the 10,000 and test on the 60,000.
        raise DataError(f"{path}: holds MNIST's {other} (its md5); the train and test files are "
                        "swapped: rename them")
    canonical_size = MNIST_SIZES["train" if name.startswith("train") else "test"]
    if len(array) == canonical_size and digest != MNIST_MD5[name]:
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


def assemble(paths: dict[tuple[str, str], str], verify: bool, source: str) -> Dataset:
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


def load_dir(data_dir: str, verify_checksums: bool = True) -> Dataset:
    """The four IDX files of a directory, gzipped or not (e.g. an offline copy of MNIST)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: not a directory; {HOW_TO_GET_MNIST}")
    paths = {key: _find_idx_file(data_dir, name) for key, name in IDX_FILES.items()}
    return assemble(paths, verify_checksums, f"idx ({os.path.abspath(data_dir)})")

