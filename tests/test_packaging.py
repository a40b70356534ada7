"""The package as users install it: a wheel that carries its default config and sample, and whose
`main` runs from any directory; importing serving code pulls in no training code."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                             str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("mnist_flax-*.whl")
    return str(path)


def test_the_wheel_carries_the_default_config_and_the_sample(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mnist_flax/configs/default.py", "mnist_flax/data/mnist_sample.npz",
            "mnist_flax/data/README.md", "mnist_flax/main.py"} <= names
    assert not any(n.startswith(("tests/", "experiments/", "benchmarks/")) for n in names)


def test_the_installed_wheel_trains_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), wheel], check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "MNIST_DATA_DIR": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax.main", "--workdir=run", "--config.data_source=sample",
         "--config.num_epochs=1", "--config.batch_size=500", "--config.conv_features=(4,8)",
         "--config.dense_features=16"],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(target / "mnist_flax" / "configs" / "default.py") in result.stderr  # Its config.
    assert result.stdout.strip().splitlines()[-1].startswith("Test accuracy: ")
    assert (elsewhere / "run" / "config.json").exists()


def test_serving_imports_no_training_code():
    script = ("import sys, mnist_flax.predict; print('mnist_flax.train' in sys.modules, "
              "'optax' in sys.modules, 'tensorboardX' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split() == ["False", "False", "False"]


def test_importing_every_module_changes_nothing_process_wide():
    """No flags defined, no log filters, no JAX backend started."""
    script = ("import ctypes, pkgutil, importlib, mnist_flax\n"
              "from absl import flags, logging\n"
              "from jax._src import xla_bridge\n"
              "for m in pkgutil.walk_packages(mnist_flax.__path__, 'mnist_flax.'):\n"
              "    importlib.import_module(m.name)\n"
              "print(any(f in flags.FLAGS for f in ('workdir', 'config', 'sweep', 'multihost')),\n"
              "      len(logging.get_absl_logger().filters), "
              "xla_bridge.backends_are_initialized())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "0", "False"]
