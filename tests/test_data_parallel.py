"""Data parallelism: `python -m mnist_flax.main` on 2 and 8 devices as users run it, and the same
training on 1 device, 8 devices, and 2 processes x 2 devices.

The batch is split over a mesh axis and the parameters are replicated; the loss curve must not
depend on how many devices or hosts share the work (up to float reassociation).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS, device_flags, run_module

WORKER = os.path.join(os.path.dirname(__file__), "data_parallel_worker.py")


def _run(*args: str, timeout: int = 300) -> dict:
    result = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def busy_core():
    """A CPU-bound process beside the run, as on a machine running other jobs."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


@pytest.mark.slow
@pytest.mark.parametrize("devices,flags,tries", [
    (2, [], 2), (8, [], 1),
    # k > 1 runs a scan, which XLA:CPU runs ~100x slower per step (docs/speed.md): tiny model.
    (2, ["--config.steps_per_dispatch=4", "--config.checkpoint_every_steps=20", *TINY_FLAGS],
     1)])
def test_main_on_several_devices_trains_to_the_end_beside_a_busy_core(tmp_path, devices, flags,
                                                                       tries):
    """main itself, its loop dispatching asynchronously, the evaluation, and a save inside the
    epoch: with the host unbounded ahead of the devices, XLA:CPU aborted it in an all-reduce
    (`progress.MAX_DISPATCHES_AHEAD`). A save syncs the host, so the runs without one are the
    ones that caught it."""
    for attempt in range(1, tries + 1):
        with busy_core():
            result = run_module(
                "main", f"--workdir={tmp_path}/run{attempt}", "--config.data_source=sample",
                "--config.num_epochs=1", *flags,
                env={"XLA_FLAGS": device_flags(devices)},
                timeout=900)
        assert result.returncode == 0, (
            f"run {attempt} of {tries} on {devices} devices exited {result.returncode}:\n"
            f"{result.stderr[-3000:]}")
        assert "Test accuracy: " in result.stdout, result.stderr[-3000:]


@pytest.fixture(scope="module")
def one_device() -> dict:
    return _run("--devices=1")


def _assert_same_run(a: dict, b: dict) -> None:
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=2e-5)
    np.testing.assert_allclose(a["checksums"], b["checksums"], rtol=1e-4)
    np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-4)
    np.testing.assert_allclose(a["loop_losses"], b["loop_losses"], rtol=2e-5)
    np.testing.assert_allclose(a["loop_checksums"], b["loop_checksums"], rtol=1e-4)
    # Within a run, the device-resident loop trains on the same batches as the host-fed steps.
    np.testing.assert_allclose(b["loop_losses"], b["losses"], rtol=2e-5)
    np.testing.assert_allclose(b["loop_checksums"], b["checksums"], rtol=1e-5)


def test_eight_devices_match_one(one_device):
    eight = _run("--devices=8")
    assert eight["devices"] == 8 and one_device["devices"] == 1
    _assert_same_run(one_device, eight)


def test_two_processes_each_feeding_its_shard_match_one_device(one_device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, WORKER, "--devices=2", "--num_processes=2", f"--port={port}"]
    procs = [subprocess.Popen([*command, f"--process_id={i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 4
        _assert_same_run(one_device, r)


def test_batch_that_does_not_divide_over_devices_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax.main", f"--workdir={tmp_path}/run",
         "--config.batch_size=100", "--config.data_source=sample"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "XLA_FLAGS": device_flags(8)})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.batch_size=100 does not divide over the 8 devices; use a multiple of 8")
