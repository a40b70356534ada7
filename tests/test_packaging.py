"""The package as users install it: a wheel that carries its default config, its sample and the
licences, and whose `main` runs from any directory; importing serving code pulls in no training
code; its version, console scripts, extras and dependencies as pip users expect them."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import REPO, TINY_FLAGS


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
         "--config.num_epochs=1", "--config.batch_size=500", *TINY_FLAGS],
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
    assert _python(script).split() == ["False", "0", "False"]


def _python(script: str) -> str:
    """`python -c script`'s stdout; it must exit 0 (else its stderr's end is the message)."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Metadata, licences, console scripts and extras, as pip users expect them.

SCRIPTS = {"mnist-flax-train": "mnist_flax.main:run",
           "mnist-flax-predict": "mnist_flax.predict:main",
           "mnist-flax-sweep": "mnist_flax.sweep:run"}
BLOCK_MATPLOTLIB = """
import runpy, sys
class NoMatplotlib:  # As if matplotlib were not installed.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoMatplotlib())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def test_version_is_the_installed_metadata_which_is_setup_cfgs():
    import mnist_flax

    assert mnist_flax.__version__ == importlib.metadata.version("mnist_flax")
    assert mnist_flax.__version__ == _setup_cfg()["metadata"]["version"]


def test_version_without_installed_metadata_is_0_unknown():
    script = ("import importlib.metadata as m\n"
              "def version(name):\n"
              "    raise m.PackageNotFoundError(name)\n"
              "m.version = version\n"
              "import mnist_flax; print(mnist_flax.__version__)\n")
    assert _python(script).strip() == "0+unknown"


def test_the_wheel_carries_the_licences(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-File: LICENSE" in text.splitlines()
    assert "License-File: mnist_flax/data/README.md" in text.splitlines()
    dist_info = metadata.rsplit("/", 1)[0]
    assert any(n.startswith(dist_info) and n.endswith("/LICENSE") for n in names), names
    assert "mnist_flax/data/README.md" in names
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert "Copyright 2026 The mnist_flax authors" in license_text


def test_the_packaged_samples_readme_states_its_licence_and_authors():
    text = " ".join((REPO / "mnist_flax" / "data" / "README.md").read_text().split())
    for needed in ("CC BY-SA 3.0", "https://creativecommons.org/licenses/by-sa/3.0/",
                   "Yann LeCun, Corinna Cortes and Christopher J.C. Burges",
                   "http://yann.lecun.com/exdb/mnist/", "not the code's Apache-2.0"):
        assert needed in text, needed


def test_the_console_scripts_are_declared_and_on_the_venvs_path():
    declared = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
                if ep.dist is not None and ep.dist.name.replace("_", "-") == "mnist-flax"}
    assert {name: ep.value for name, ep in declared.items()} == SCRIPTS
    for name, ep in declared.items():
        assert callable(ep.load()), name
        scripts = sysconfig.get_path("scripts")
        assert shutil.which(name, path=scripts), (
            f"{name} is not in {scripts}; reinstall: pip install -e '.[test]'")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_answers_help_with_exit_0(name):
    script = shutil.which(name, path=sysconfig.get_path("scripts"))
    assert script, f"{name} is not installed; reinstall: pip install -e '.[test]'"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    if name == "mnist-flax-predict":
        assert "usage" in result.stdout.lower(), result.stdout[-3000:]
        return
    # absl's --help is the main module's docstring and the key flags of the module named
    # sys.argv[0]: here the script's path, not the module that defines the flags.
    assert "python -m mnist_flax." in result.stdout, result.stdout[-3000:]
    for flag in ("--workdir", "--config"):
        assert f"  {flag}:" in result.stdout, result.stdout[-3000:]


def test_plot_without_matplotlib_is_one_line_naming_the_plots_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_MATPLOTLIB, str(REPO / "experiments" / "plot.py"),
         f"--out={tmp_path / 'plot.png'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "pip install 'mnist_flax[plots]'" in line
    assert not (tmp_path / "plot.png").exists()
    table = subprocess.run(  # The Markdown table needs no matplotlib.
        [sys.executable, "-c", BLOCK_MATPLOTLIB, str(REPO / "experiments" / "plot.py"),
         "--table"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-3000:]
    assert table.stdout.startswith("| experiment |")
    piped = subprocess.run(  # Into a reader that left (`| head`, here at once): quiet, exit 0.
        ["bash", "-c", f"set -o pipefail; {shlex.quote(sys.executable)} "
         f"{shlex.quote(str(REPO / 'experiments' / 'plot.py'))} --table | true"],
        capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr[-3000:]


def _imported_top_level_modules(root: pathlib.Path) -> set[str]:
    modules = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - {"mnist_flax"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!;~]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# Requirements that only bound a dependency's dependency (setup.cfg says why each is there).
VERSION_BOUNDS_ONLY = {"ml-dtypes"}


def test_what_the_package_imports_is_what_it_declares():
    """Every third-party module mnist_flax imports comes from a declared distribution (the gcs
    extra's included), and every runtime requirement is imported: none unused, none missing,
    except those that only bound the version of what jax imports."""
    requires = importlib.metadata.requires("mnist_flax")
    declared = {_name(r) for r in requires}
    runtime = {_name(r) for r in requires if "extra ==" not in r}
    providers = importlib.metadata.packages_distributions()
    imported = set()
    for module in _imported_top_level_modules(REPO / "mnist_flax"):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists & declared, f"mnist_flax imports {module} ({dists}); no requirement has it"
        if len(dists) == 1:
            imported |= dists
    assert runtime - imported == VERSION_BOUNDS_ONLY, "declared in install_requires, never imported"


def test_the_notebook_extra_runs_the_tutorial_with_the_test_extras_bounds():
    """`pip install -e '.[notebook]'` (README) gives what docs/tutorial.ipynb imports beyond the
    install, Jupyter to open it and its kernel, each bounded as the test extra that runs it."""
    extras = _setup_cfg()["options.extras_require"]
    notebook, test = ({_name(r): r for r in extras[name].split("\n") if r and r[0] != "#"}
                      for name in ("notebook", "test"))
    assert {"matplotlib", "jupyterlab", "ipykernel"} <= set(notebook)
    for name in set(notebook) & set(test):
        assert notebook[name] == test[name], name
    cells = json.loads((REPO / "docs" / "tutorial.ipynb").read_text())["cells"]
    tree = ast.parse("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    imported = {alias.name.partition(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.partition(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    installed = {_name(r) for r in importlib.metadata.requires("mnist_flax") if "extra ==" not in r}
    providers = importlib.metadata.packages_distributions()
    for module in imported - set(sys.stdlib_module_names) - {"mnist_flax"}:
        dists = {_name(d) for d in providers.get(module, [])}
        assert dists & (installed | set(notebook)), f"the tutorial imports {module} ({dists})"


@pytest.mark.parametrize("cuda", ["cuda12", "cuda13"])
def test_the_cuda_extras_have_the_same_bounds_as_jax(cuda):
    extras = _setup_cfg()["options.extras_require"]
    requires = [r.strip() for r in _setup_cfg()["options"]["install_requires"].splitlines()]
    jax = next(r for r in requires if _name(r) == "jax")
    assert extras[cuda].split() == [jax.replace("jax", f"jax[{cuda}]", 1)]
    assert _setup_cfg()["options"]["python_requires"] == ">=3.11"


def test_the_package_imports_no_private_jax_module():
    """`jax._src` changes without notice between releases (the floors to the newest must work)."""
    private = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "mnist_flax").rglob("*.py")
               for n, line in enumerate(path.read_text().splitlines(), 1)
               if re.match(r"\s*(from|import)\s+jax\._src\b", line)]
    assert not private
