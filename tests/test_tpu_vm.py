"""The README's TPU block as printed, from creating the TPU VM to deleting it, against a stand-in
`gcloud` (tests/gcloud_standin.py) whose pod slice is 2 local hosts x 2 CPU devices, each in a
mount namespace with a home of its own, sharing only the GCS emulator (the bucket).

The test parses the fenced bash block out of README.md's TPU section and runs its lines with the
stand-in first on PATH: the pod trains on the packaged sample, is stopped with the README's stop
line (SIGTERM, 143), and the README's train line resumes it to the Test loss/accuracy lines of an
uninterrupted run, without installing anything again. What the stand-in cannot do as a VM does,
the hosts' environment gives tpu/run.sh instead: MNIST_FLAX_PYTHON (this machine's Python 3.11
for the venv, not uv's 3.12 download), MNIST_FLAX_EXTRA=gcs (not jax[tpu]'s libtpu), PYTHONPATH
to this venv's packages (the dependencies a VM downloads; pip still builds and installs the
package) and MNIST_FLAX_FLAGS (a tiny model on the sample)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
from conftest import REPO, TINY_FLAGS, device_flags, snapshot, unshare_works
from gcs_emulator import separate_emulator

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

STANDIN = REPO / "tests" / "gcloud_standin.py"
WORKDIR = "gs://my-bucket/runs/default"  # The README's.
# 4,000 sample images at 64 a step: 62 steps; a checkpoint and a log line every 10.
FLAGS = ["--config.data_source=sample", "--config.batch_size=64", "--config.num_epochs=1",
         *TINY_FLAGS, "--config.checkpoint_every_steps=10", "--config.log_every_steps=10"]
STEPS = 62
# Sized for a machine 3x slower than a busy 2-core one, where a pod's start (venv and install
# included) to its first checkpoint took ~25 s and a whole run ~35 s.
WAIT_S = 300


def readme_tpu_block() -> list[str]:
    """The commands of the first fenced bash block in README.md's TPU section, continuation lines
    joined, comments and blank lines left out."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n### TPU VMs and multi-host\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands = re.sub(r"\\\n\s*", "", block).splitlines()
    return [c for c in commands if c.strip() and not c.lstrip().startswith("#")]


def _image_packages(tmp_path: pathlib.Path) -> pathlib.Path:
    """This venv's site-packages as a directory of links, without mnist_flax's own entries (its
    editable finder would map the package to this checkout): the dependencies a VM downloads."""
    packages = tmp_path / "image-packages"
    packages.mkdir()
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if "mnist_flax" not in entry.name and not entry.name.endswith(".pth"):
            (packages / entry.name).symlink_to(entry)
    return packages


def _run(line: str, env: dict, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    """One README line with bash, from the repository's root, as a user runs it."""
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a line that must succeed; else the message is their ends."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _log(state: pathlib.Path, worker: int) -> str:
    path = state / "tpus" / "my-tpu" / f"worker-{worker}" / "home" / "mnist_flax" / "train.log"
    return path.read_text() if path.exists() else ""


def _runs(state: pathlib.Path, worker: int) -> list[str]:
    """The worker's log, one piece per start of run.sh's wrapper."""
    return re.split(r"^== .*: /\S+/python -m mnist_flax.main .*\n", _log(state, worker),
                    flags=re.M)[1:]


def _tails(state: pathlib.Path) -> str:
    return "\n".join(f"--- worker {i}'s train.log:\n" + "\n".join(_log(state, i).splitlines()[-25:])
                     for i in range(2))


def _wait_for_exit(state: pathlib.Path, starts: int) -> list[str]:
    """Until run number `starts` has exited on both workers; their logs of it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        runs = [_runs(state, i) for i in range(2)]
        if all(len(r) >= starts and "exited with" in r[starts - 1] for r in runs):
            return [r[starts - 1] for r in runs]
        if time.monotonic() > deadline:
            pytest.fail(f"run {starts} did not end in {WAIT_S} s\n{_tails(state)}")
        time.sleep(0.5)


def _follow_until(line: str, env: dict, state: pathlib.Path, pattern: str) -> str:
    """Runs the README's `tail -f` line until its output matches `pattern`, then drops the
    connection (SIGTERM to gcloud); what it printed."""
    process = subprocess.Popen(["bash", "-c", line], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    output, deadline = "", time.monotonic() + WAIT_S
    try:
        while not re.search(pattern, output, re.M):
            assert process.poll() is None or select.select([process.stdout], [], [], 0)[0], (
                f"the log's tail ended with {process.returncode}\n{output[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} in the log in {WAIT_S} s\n{_tails(state)}")
            if select.select([process.stdout], [], [], 1)[0]:
                output += process.stdout.readline()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # The user's Ctrl-C or a lost connection.
        process.communicate(timeout=60)
    return output


@contextlib.contextmanager
def _leftovers_killed(state: pathlib.Path):
    """On the way out, SIGKILL to a run still going on a worker (a failed test's), by the pid
    run.sh wrote: the stand-in's delete, unlike a real one, ends no process."""
    try:
        yield
    finally:
        for pidfile in state.glob("tpus/*/worker-*/home/mnist_flax/train.pid"):
            pid = pidfile.read_text().strip()
            with contextlib.suppress(OSError, ValueError):
                if b"mnist_flax.main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)


def _test_lines(run_log: str) -> list[str]:
    return [line for line in run_log.splitlines() if line.startswith(("Test loss:", "Test acc"))]


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(),
                    reason="needs `unshare -m` (root or user namespaces) for private mounts")
def test_the_readme_tpu_block_from_create_to_delete(tmp_path):
    block = readme_tpu_block()
    expected = ["storage buckets create", "tpu-vm create", "mkdir -p mnist_flax", "tpu-vm scp",
                f"run.sh {WORKDIR}", "tail -f", "run.sh --stop", "tpu-vm delete"]
    assert len(block) == len(expected), block
    for command, what in zip(block, expected, strict=True):
        assert command.startswith("gcloud ") and what in command, (what, command)
    create_bucket, create_tpu, mkdir, copy, train, follow, stop, delete = block

    state = tmp_path / "gcloud"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    gcloud.chmod(0o755)

    with separate_emulator(tmp_path) as emulator, _leftovers_killed(state):
        env = {**os.environ, **emulator.env, "GCLOUD_STANDIN_DIR": str(state),
               # The hosts' PATH, as on a VM: not this venv's bin.
               "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
               "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
               "XLA_FLAGS": device_flags(2), "MNIST_DATA_DIR": "",
               # The Python this venv was made with (not the venv's, whose packages it has).
               "MNIST_FLAX_PYTHON": sys._base_executable, "MNIST_FLAX_EXTRA": "gcs",
               "PYTHONPATH": str(_image_packages(tmp_path)),
               "MNIST_FLAX_FLAGS": " ".join(FLAGS)}
        env.pop("VIRTUAL_ENV", None)

        _ok(_run(create_bucket, env))
        _ok(_run(create_tpu, env))
        _ok(_run(mkdir, env))
        _ok(_run(copy, env))
        for i in range(2):
            home = state / "tpus" / "my-tpu" / f"worker-{i}" / "home"
            assert (home / "mnist_flax" / "setup.cfg").exists()
            assert (home / "mnist_flax" / "tpu" / "run.sh").exists()

        # Made ready and started on both hosts; running after ssh's session hung up.
        out = _ok(_run(train, env))
        assert out.count("installing the package") == 2, out
        assert out.count("started python -m mnist_flax.main") == 2, out
        shown = _follow_until(follow, env, state, rf"step \d+/{STEPS}:|^== .*exited")
        assert "exited" not in shown, _tails(state)  # Training, on the sample.

        # Stopped by the README's line: both hosts save after the same step and exit 143.
        out = _ok(_run(stop, env))
        assert out.count("exited with 143") == 2, out + _tails(state)
        stopped = _wait_for_exit(state, 1)
        saved = re.findall(r"saved the checkpoint at step (\d+);", stopped[0])
        assert saved and 10 <= int(saved[-1]) < STEPS, _tails(state)

        # The same train line again: installs nothing, changes nothing in the venvs, resumes.
        venvs = [state / "tpus" / "my-tpu" / f"worker-{i}" / "home" / "mnist_flax" / ".venv"
                 for i in range(2)]
        before = [snapshot(v) for v in venvs]
        out = _ok(_run(train, env))
        assert "installing" not in out and "making" not in out, out
        assert [snapshot(v) for v in venvs] == before
        again = _run(train, env)  # While it runs: one line per host, nothing started.
        assert again.returncode == 1 and again.stderr.count(
            "error: a run is already going on this host") == 2, again.stderr[-2000:]
        resumed = _wait_for_exit(state, 2)
        for run_log in resumed:
            assert "exited with 0" in run_log, _tails(state)
        assert f"Resuming from the checkpoint at step {saved[-1]}" in resumed[0], _tails(state)

        # An uninterrupted run of the same command, on another workdir, prints the same lines.
        _ok(_run(train.replace(WORKDIR, "gs://my-bucket/runs/uninterrupted"), env))
        uninterrupted = _wait_for_exit(state, 3)
        assert "exited with 0" in uninterrupted[0], _tails(state)
        assert len(_test_lines(uninterrupted[0])) == 2, _tails(state)
        assert _test_lines(resumed[0]) == _test_lines(uninterrupted[0])

        _ok(_run(delete, env))
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    assert calls[0][:3] == ["storage", "buckets", "create"]
    assert calls[-1][:5] == ["compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert "not found" in _run(mkdir, env).stderr.lower()  # The VM is gone.


def test_run_sh_needs_a_bucket_workdir():
    for args, message in ([[], "error: the workdir is missing: "],
                          [["runs/default"], "error: the workdir must be a bucket, gs://"],
                          [["gs://"], "error: the workdir must be a bucket, gs://"]):
        result = subprocess.run(["bash", str(REPO / "tpu" / "run.sh"), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
