"""Shared test helpers: configs, small IDX files written on the fly, the real MNIST when present."""

from __future__ import annotations

import gzip
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mnist_flax import configs

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "mnist"
# The metrics `train_and_evaluate` returns that are timings, not results: they differ between two
# runs of the same config.
TIMING_METRICS = frozenset({"train/images_per_second", "train/tflops_per_device",
                            "train/utilization"})
# A model small enough that a test trains it in seconds; every other field is the tutorial's.
# (8, 16), not (4, 8): XLA:CPU compiles the training step of the narrower one more slowly.
TINY_MODEL = {"conv_features": (8, 16), "dense_features": 16}
TINY_FLAGS = (f"--config.conv_features=({','.join(map(str, TINY_MODEL['conv_features']))})",
              f"--config.dense_features={TINY_MODEL['dense_features']}")  # As a command gives it.
COMPILATION_CACHE_BYTES = 1 << 30  # The tests' cache of compiled programs, kept between runs.
# The tests compile with LLVM at -O2 (XLA's default: -O3), they and the commands they start: the
# same programs to the same bits (tests/test_ops.py pins it for the training step), compiled in
# about 55% of the time. Most of the tests' time is compiling; the users' runs keep -O3. A test
# that gives a command several CPU devices adds them to it (`device_flags`).
TESTS_XLA_FLAG = "--xla_backend_optimization_level=2"


def load_config(name: str = "default") -> ml_collections.ConfigDict:
    """A config as `--config` loads it: the packaged default, or experiments/<name>.py."""
    return configs.load() if name == "default" else configs.load(
        str(REPO / "experiments" / f"{name}.py"))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The default config with TINY_MODEL and `overrides`."""
    config = load_config()
    config.update(TINY_MODEL)
    config.update(overrides)
    return config


def assert_trees_identical(a, b) -> None:
    """Same structure, dtypes, shapes and bits, leaf by leaf; the message names the leaf."""
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten(b)[0]
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def snapshot(directory) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and mtime: what 'nothing was touched' means."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            st = os.stat(path)
            files[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
    return files


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300,
               script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m mnist_flax.<module> ARGS` (or `python -c script ARGS`) from the repository,
    with $MNIST_DATA_DIR unset so a test never trains on the full data by accident."""
    command = ["-c", script] if script else ["-m", f"mnist_flax.{module}"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO,
                          env={**os.environ, "MNIST_DATA_DIR": "", **(env or {})})


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


def write_idx_files(directory: pathlib.Path, train: tuple[np.ndarray, np.ndarray],
                    test: tuple[np.ndarray, np.ndarray], gz: bool = True) -> pathlib.Path:
    """The four MNIST IDX files of (images, labels) `train` and `test`, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / "train-images-idx3-ubyte", train[0], gz)
    write_idx(directory / "train-labels-idx1-ubyte", train[1], gz)
    write_idx(directory / "t10k-images-idx3-ubyte", test[0], gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", test[1], gz)
    return directory


def write_idx_dir(directory: pathlib.Path, n_train: int = 256, n_test: int = 64,
                  gz: bool = True, seed: int = 0) -> pathlib.Path:
    """A directory of the four MNIST IDX files holding synthetic digits."""
    return write_idx_files(directory, synthetic_digits(n_train, seed),
                           synthetic_digits(n_test, seed + 1), gz)


def device_flags(devices: int) -> str:
    """XLA_FLAGS for a process of `devices` CPU devices, keeping the tests' own (TESTS_XLA_FLAG)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def pytest_configure(config: pytest.Config) -> None:
    """TESTS_XLA_FLAG in XLA_FLAGS, before any test starts JAX's backend (which reads it once)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if TESTS_XLA_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TESTS_XLA_FLAG}".strip()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (a stable sort), so that pytest-xdist's workers (pyproject.toml runs
    three) start the long ones early and end together instead of one waiting on the other. A file
    goes to a worker where its first test comes (--no-loadscope-reorder in pyproject.toml: by
    default xdist hands out the files with the most tests first, whatever this order says)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Keeps the tests' compilation cache (below) under COMPILATION_CACHE_BYTES, dropping the
    oldest entries first: JAX's own limit needs `filelock`, which the test extra lacks."""
    cache = getattr(session.config, "cache", None)
    if cache is None or hasattr(session.config, "workerinput"):  # Once, in xdist's controller.
        return
    entries = sorted(cache.mkdir("jax").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for entry in entries:
        total += entry.stat().st_size
        if total > COMPILATION_CACHE_BYTES:
            entry.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(request: pytest.FixtureRequest, tmp_path_factory) -> None:
    """The tests' compilations, in the commands they start and in the tests' own processes, are
    cached in pytest's cache directory (.pytest_cache/d/jax), not in the user's ~/.cache (the
    default of config.compilation_cache_dir). It is kept between runs, so a run after a change
    compiles only what the change touched; `pytest --cache-clear` empties it, and with
    `-p no:cacheprovider` the session's temporary directory holds it. JAX keys each entry on the
    program, its compile options and JAX's version, so no stale entry is ever loaded. One
    directory for all of the session's xdist workers, so one compiles what the others then load
    (JAX writes entries atomically). In process too, as main turns it on: every
    train_and_evaluate builds a new TrainState (its optimizer is part of the jit's key), so
    without it each one compiled its steps again."""
    from mnist_flax.run import process

    if getattr(request.config, "cache", None) is not None:
        cache = request.config.cache.mkdir("jax")
    else:
        base = tmp_path_factory.getbasetemp()
        cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
        cache.mkdir(exist_ok=True)
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
             "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
        process.enable_compilation_cache(str(cache))
        yield
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture
def idx_dir(tmp_path) -> pathlib.Path:
    return write_idx_dir(tmp_path / "mnist")


@pytest.fixture
def shared_mnist() -> pathlib.Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("../shared/mnist (the full MNIST) is not present")
    return SHARED_MNIST


def train_as_main(config: ml_collections.ConfigDict, workdir, **kwargs):
    """`train.train_and_evaluate` inside main's operations (lock, signals, walk-back)."""
    from mnist_flax import train
    from mnist_flax.run import operations

    with operations.held(str(workdir), config, **kwargs) as hooks:
        return train.train_and_evaluate(config, str(workdir), hooks)


def snapshot_but_lock(directory) -> dict[str, tuple[int, int]]:
    """`snapshot` without the workdir's `.lock`, which every run that takes the lock rewrites
    with its pid (it is taken before the workdir is read)."""
    return {name: stat for name, stat in snapshot(directory).items() if name != ".lock"}


def one_line(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The last stderr line of a command that must fail with `code` and print no traceback; on
    failure the assertion shows the command's last stderr lines."""
    tail = result.stderr[-3000:]
    assert result.returncode == code, tail
    assert "Traceback" not in result.stderr, tail
    last = (result.stderr.strip().splitlines() or [""])[-1]
    assert last.startswith("error: ") or code in (130, 143), tail
    return last


def tiny_main_flags(data_dir, workdir, *extra: str) -> list[str]:
    """main's flags for a seconds-long run of TINY_MODEL on a synthetic IDX directory."""
    return [f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.num_epochs=1",
            "--config.batch_size=32", "--config.verify_checksums=False",
            *TINY_FLAGS, *extra]


def unshare_works() -> bool:
    """Whether `unshare -m` can give a process private mounts (root, or user namespaces): the
    pod and TPU VM tests run each host in one, with a home and /tmp of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0
