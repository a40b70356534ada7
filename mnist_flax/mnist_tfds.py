"""MNIST through TensorFlow Datasets, TensorFlow-free: a prepared copy read with
`tfds.data_source`, or the four files fetched by TFDS's download manager (cached) and parsed here.
"""

from __future__ import annotations

import glob
import os
import socket
import urllib.parse

import numpy as np

from mnist_flax import mnist_idx
from mnist_flax.input_pipeline import (
    HOW_TO_GET_MNIST,
    IMAGE_SHAPE,
    NUM_CLASSES,
    DataError,
    Dataset,
)


def _tfds_corrupt(data_dir: str | None, e: Exception) -> DataError:
    """One line for a TFDS mnist copy whose metadata or shards TFDS cannot read."""
    reason = (str(e).strip().splitlines() or [""])[-1][:200]
    return DataError(
        f"{data_dir or 'TFDS default data dir'}: the TFDS mnist copy there is corrupt "
        f"({type(e).__name__}: {reason}); delete {os.path.join(_tfds_root(data_dir), 'mnist')} "
        "and prepare it again, or use --config.data_source=idx"
    )


def _not_found(data_dir: str | None) -> DataError:
    """One line for --config.data_source=tfds where no prepared copy is: where it looked, and the
    two ways to get MNIST (TFDS's download, or the IDX files)."""
    return DataError(
        f"--config.data_source=tfds: no prepared TFDS mnist found in {_tfds_root(data_dir)} "
        "(--config.tfds_data_dir or $TFDS_DATA_DIR to look elsewhere); run once with network "
        "access so TFDS downloads MNIST, or use --config.data_source=idx with $MNIST_DATA_DIR (or "
        "--config.data_dir) pointing at the four MNIST IDX files"
    )


def _copy_exists(data_dir: str | None) -> bool:
    """Whether a local TFDS mnist copy has metadata at all (a gs:// one: asked of TFDS)."""
    root = _tfds_root(data_dir)
    return "://" in root or bool(
        glob.glob(os.path.join(root, "mnist", "*", "dataset_info.json")))


def tfds_prepared(data_dir: str | None) -> bool:
    if not _copy_exists(data_dir):
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
    if not _copy_exists(data_dir):  # Asking TFDS would log a warning line first.
        raise _not_found(data_dir)
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
            if "has not been generated" in str(e):  # Metadata, but never prepared.
                raise _not_found(data_dir) from None
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
    return all(glob.glob(os.path.join(downloads, f"*{name}*.gz"))
               for name in mnist_idx.IDX_FILES.values())


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
    urls = {key: urllib.parse.urljoin(base, name + ".gz")
            for key, name in mnist_idx.IDX_FILES.items()}
    try:
        paths = manager.download({"/".join(k): u for k, u in urls.items()})
    except Exception as e:  # requests/TFDS raise many types; all mean the same thing here.
        raise DataError(f"downloading MNIST from {base} failed ({type(e).__name__}); "
                        f"{HOW_TO_GET_MNIST}") from None
    local = {key: os.fspath(paths["/".join(key)]) for key in mnist_idx.IDX_FILES}
    return mnist_idx.assemble(local, verify_checksums,
                              f"tfds download ({base} -> {root}/downloads)")



def load(data_dir: str | None, verify_checksums: bool = True, required: bool = False
         ) -> Dataset | None:
    """A prepared copy in `data_dir` (None: TFDS's default), else a download when cached or the
    network answers; else None, or (`required`) the prepared copy's own error."""
    if tfds_prepared(data_dir) or (required and not (downloads_cached(data_dir)
                                                     or network_available(mnist_url()))):
        return load_tfds_prepared(data_dir)
    if downloads_cached(data_dir) or network_available(mnist_url()):
        return download_tfds(data_dir, verify_checksums)
    return None
