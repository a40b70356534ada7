"""Data sources: IDX reader and its errors, TFDS (mocked and over a loopback server), the sample."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import socket
import threading
import time

import hypothesis
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import idx_bytes, load_config, synthetic_digits, write_idx, write_idx_dir
from hypothesis import strategies as st

from mnist_flax import input_pipeline, mnist_idx, mnist_tfds
from mnist_flax.input_pipeline import DataError


def _config(**overrides):
    config = load_config()
    config.update(overrides)
    return config


# ---------------------------------------------------------------------------------------------
# IDX files.


@pytest.mark.parametrize("gz, named_gz", [(True, True), (False, False), (False, True),
                                          (True, False)])
def test_idx_dir_round_trip(tmp_path, gz, named_gz):
    """Gzipped or not is read from the bytes, not the name (a plain file may be named .gz)."""
    directory = write_idx_dir(tmp_path / "d", n_train=30, n_test=20, gz=gz)
    for path in list(directory.iterdir()) if gz != named_gz else []:
        path.rename(path.with_name(path.name + ".gz" if named_gz else path.stem))
    dataset = mnist_idx.load_dir(str(directory))
    expected_train, expected_test = synthetic_digits(30, 0), synthetic_digits(20, 1)
    np.testing.assert_array_equal(dataset.train_images, expected_train[0])
    np.testing.assert_array_equal(dataset.train_labels, expected_train[1])
    np.testing.assert_array_equal(dataset.test_labels, expected_test[1])
    assert dataset.train_images.dtype == np.uint8 and dataset.train_images.shape == (30, 28, 28, 1)
    assert dataset.train_labels.dtype == np.int32
    assert "idx" in dataset.source


def _break(directory, name, data):
    for p in directory.glob(name + "*"):
        p.unlink()
    (directory / name).write_bytes(data)


@pytest.mark.parametrize(
    "name, corrupt, message",
    [
        ("train-images-idx3-ubyte", lambda b: b[:1000], "truncated"),
        ("train-images-idx3-ubyte", lambda b: b[:10], "truncated"),
        ("train-images-idx3-ubyte", lambda b: b + b"\0", "trailing bytes"),
        ("train-labels-idx1-ubyte", lambda b: b"\x00\x00\x08\x03" + b[4:], "wrong magic"),
        ("t10k-images-idx3-ubyte", lambda b: b"\x00\x00\x09\x99" + b[4:], "wrong magic"),
        ("train-labels-idx1-ubyte", lambda b: b[:-1] + b"\x0c", "outside 0-9"),
        ("t10k-images-idx3-ubyte",
         lambda b: np.array([2051, 64, 14, 56], ">u4").tobytes() + b[16:], "14x56"),
    ],
)
def test_idx_errors_name_the_file_and_problem(idx_dir, name, corrupt, message):
    original = gzip.decompress((idx_dir / (name + ".gz")).read_bytes())
    _break(idx_dir, name, corrupt(original))
    with pytest.raises(DataError, match=message) as info:
        mnist_idx.load_dir(str(idx_dir))
    assert name in str(info.value) and "\n" not in str(info.value)


def test_idx_count_mismatch(idx_dir):
    _break(idx_dir, "train-labels-idx1-ubyte", idx_bytes(np.zeros(255, np.uint8)))
    with pytest.raises(DataError, match="256 images but .* has 255 labels"):
        mnist_idx.load_dir(str(idx_dir))


def test_idx_corrupt_gzip(idx_dir):
    path = idx_dir / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: cannot read it"):
        mnist_idx.load_dir(str(idx_dir))


def test_idx_missing_file_and_dir(idx_dir, tmp_path):
    (idx_dir / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"):
        mnist_idx.load_dir(str(idx_dir))
    with pytest.raises(DataError, match="not a directory"):
        mnist_idx.load_dir(str(tmp_path / "nope"))


def test_canonical_size_file_must_match_md5(tmp_path):
    """A full-size file under an MNIST name must be the real bytes, unless checks are off."""
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10_000) % 10)
    with pytest.raises(DataError, match="md5 .* is not the canonical MNIST"):
        mnist_idx.read_idx(str(path), "labels")
    labels = mnist_idx.read_idx(str(path), "labels", verify_checksum=False)
    assert len(labels) == 10_000


@pytest.mark.parametrize("kind", ["pipe", "directory"])
def test_a_pipe_or_directory_where_an_idx_file_should_be_is_refused_not_read(idx_dir, kind):
    """open() of a FIFO blocks until a writer comes: the check must come before it, in one line."""
    (idx_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    path = idx_dir / "t10k-labels-idx1-ubyte"
    if kind == "pipe":
        os.mkfifo(path)
    else:
        path.mkdir()
    outcome = {}

    def load():
        try:
            mnist_idx.load_dir(str(idx_dir))
        except DataError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # Blocked in open(): a writer's open and close let it go.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail(f"load_dir hung reading {path}")
    what = "a pipe or device" if kind == "pipe" else "a directory"
    assert outcome == {"error": f"{path}: not a regular file ({what}); put the IDX file itself "
                                "there (or a symlink to it)"}


@pytest.mark.parametrize("swapped", [("images", "labels"), ("labels",)], ids=["both", "labels"])
def test_swapped_train_and_test_files_are_refused_by_their_md5(shared_mnist, tmp_path, swapped):
    """Each real MNIST file is known by its md5: under the other split's name it is refused,
    instead of training on the 10,000 test images and testing on the 60,000 training ones."""
    names = {"images": "idx3-ubyte", "labels": "idx1-ubyte"}
    for kind, suffix in names.items():
        train, test = f"train-{kind}-{suffix}.gz", f"t10k-{kind}-{suffix}.gz"
        if kind in swapped:
            train, test = test, train
        (tmp_path / f"train-{kind}-{suffix}.gz").symlink_to(shared_mnist / train)
        (tmp_path / f"t10k-{kind}-{suffix}.gz").symlink_to(shared_mnist / test)
    first = f"train-{swapped[0]}-{names[swapped[0]]}"
    with pytest.raises(DataError) as info:
        mnist_idx.load_dir(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path}/{first}.gz: holds MNIST's {first.replace('train', 't10k')} (its md5); "
        "the train and test files are swapped: rename them")


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(data=st.binary(max_size=200), kind=st.sampled_from(["images", "labels"]))
def test_parse_idx_fuzz_random_bytes(data, kind):
    """Any bytes either parse into a valid array or raise DataError, never anything else."""
    try:
        array = mnist_idx.parse_idx(data, kind)
    except DataError:
        return
    if kind == "labels":
        assert array.dtype == np.int32 and (array.size == 0 or array.max() <= 9)
    else:
        assert array.shape[1:] == (28, 28, 1)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(
    labels=st.lists(st.integers(0, 255), max_size=50),
    flip=st.integers(0, 300),
)
def test_parse_idx_fuzz_damaged_label_files(labels, flip):
    data = bytearray(idx_bytes(np.array(labels, np.uint8)))
    if flip < len(data):
        data[flip] ^= 0xFF
    try:
        parsed = mnist_idx.parse_idx(bytes(data), "labels")
    except DataError:
        return
    assert parsed.max(initial=0) <= 9


def test_shared_mnist_is_the_real_thing(shared_mnist):
    dataset = mnist_idx.load_dir(str(shared_mnist))  # md5-verified.
    assert dataset.train_images.shape == (60_000, 28, 28, 1)
    assert dataset.test_images.shape == (10_000, 28, 28, 1)
    # Class counts from shared/mnist/README.md.
    np.testing.assert_array_equal(
        np.bincount(dataset.test_labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(
        np.bincount(dataset.train_labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])


# ---------------------------------------------------------------------------------------------
# The packaged sample and choosing a source.


def test_packaged_sample_split_is_stratified_and_fixed():
    first, second = input_pipeline.load_packaged_sample(), input_pipeline.load_packaged_sample()
    assert first.train_images.shape == (4000, 28, 28, 1) and len(first.test_labels) == 1000
    np.testing.assert_array_equal(np.bincount(first.train_labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(first.test_labels), [100] * 10)
    np.testing.assert_array_equal(first.test_images, second.test_images)
    train_rows = {img.tobytes() for img in first.train_images}
    assert not any(img.tobytes() in train_rows for img in first.test_images)
    assert first.train_images.max() == 255  # Real pixel values, not [0, 1] floats.


def test_explicit_data_dir_wins(idx_dir, monkeypatch):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    dataset = input_pipeline.load_dataset(_config(data_dir=str(idx_dir)))
    assert dataset.source.startswith("idx") and len(dataset.train_labels) == 256


def test_env_data_dir(idx_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(idx_dir))
    assert input_pipeline.load_dataset(_config()).source.startswith("idx")


def test_idx_source_without_dir_is_an_error(monkeypatch):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="needs --config.data_dir"):
        input_pipeline.load_dataset(_config(data_source="idx"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_auto_offline_falls_back_to_sample_fast(tmp_path, monkeypatch, caplog):
    """No data dir, no TFDS copy, no network: the sample, a loud warning, no minutes of retries."""
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(mnist_tfds, "mnist_url", lambda: f"http://127.0.0.1:{_closed_port()}/")
    start = time.perf_counter()
    dataset = input_pipeline.load_dataset(_config(tfds_data_dir=str(tmp_path / "tfds")))
    assert time.perf_counter() - start < 15
    assert dataset.source.startswith("sample") and len(dataset.train_labels) == 4000
    assert "PACKAGED SAMPLE" in caplog.text and "MNIST_DATA_DIR" in caplog.text


def test_network_check_is_quick_when_host_is_unreachable():
    start = time.perf_counter()
    assert not mnist_tfds.network_available("https://nonexistent.invalid/x", timeout_s=3)
    assert not mnist_tfds.network_available(f"http://127.0.0.1:{_closed_port()}/")
    assert time.perf_counter() - start < 8


# ---------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_prepared_copy_under_mock_data(monkeypatch, tmp_path):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    info = tmp_path / "tfds" / "mnist" / "3.0.1" / "dataset_info.json"  # A copy is there...
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    with tfds.testing.mock_data(num_examples=40):  # ... and TFDS reads mock data for it.
        dataset = input_pipeline.load_dataset(_config(data_source="tfds",
                                                      tfds_data_dir=str(tmp_path / "tfds")))
    assert dataset.source.startswith("tfds")
    assert dataset.train_images.shape == (40, 28, 28, 1) and dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int32 and dataset.train_labels.max() <= 9


def test_tfds_without_a_prepared_copy_or_network_says_where_it_looked_and_how_to_get_one(
        tmp_path, monkeypatch, caplog):
    """It said the copy 'is corrupt' and to delete a directory that did not exist."""
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(mnist_tfds, "mnist_url", lambda: f"http://127.0.0.1:{_closed_port()}/")
    for tfds_dir in (str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(DataError) as info:
            input_pipeline.load_dataset(_config(data_source="tfds", tfds_data_dir=tfds_dir))
        assert str(info.value) == (
            f"--config.data_source=tfds: no prepared TFDS mnist found in {tfds_dir} "
            "(--config.tfds_data_dir or $TFDS_DATA_DIR to look elsewhere); run once with network "
            "access so TFDS downloads MNIST, or use --config.data_source=idx with $MNIST_DATA_DIR "
            "(or --config.data_dir) pointing at the four MNIST IDX files")
    assert "corrupt" not in caplog.text and "dataset_info" not in caplog.text, caplog.text


@pytest.fixture
def mnist_server(tmp_path):
    """A loopback HTTP server that serves small IDX .gz files, standing in for TFDS's MNIST URL."""
    served = write_idx_dir(tmp_path / "served", n_train=40, n_test=20, gz=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", server
    server.shutdown()
    server.server_close()


def test_tfds_download_then_offline_cache(tmp_path, monkeypatch, mnist_server):
    url, server = mnist_server
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(mnist_tfds, "mnist_url", lambda: url)
    config = _config(tfds_data_dir=str(tmp_path / "tfds"))
    dataset = input_pipeline.load_dataset(config)  # auto: the network answers -> TFDS download.
    assert dataset.source.startswith("tfds download") and len(dataset.train_labels) == 40
    np.testing.assert_array_equal(dataset.train_labels, synthetic_digits(40, 0)[1])

    server.shutdown()  # The network is gone: only TFDS's download cache can help now.
    server.server_close()
    start = time.perf_counter()
    again = input_pipeline.load_dataset(config)
    assert time.perf_counter() - start < 15
    assert again.source.startswith("tfds download")
    np.testing.assert_array_equal(again.train_images, dataset.train_images)
