"""A pod slice whose hosts share no disk: 2 processes x 2 CPU devices over loopback, each in its
own mount namespace with a private tmpfs scratch directory, sharing only a gs:// workdir on the
GCS emulator. Each host runs the command a user runs where no cluster manager tells JAX the other
hosts, `python -m mnist_flax.main --multihost --coordinator_address=127.0.0.1:PORT
--num_processes=2 --process_id=N`, with its 2 CPU devices from XLA_FLAGS in its environment.
Preempted (SIGTERM to one host), then killed with SIGKILL mid-epoch, and rerun each time, they
end with the parameters of an uninterrupted single-process run; with a local workdir they stop at
once with one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS, device_flags, unshare_works
from gcs_emulator import gcs_bucket_path, gcs_emulator  # noqa: F401 (fixtures)

pytest.importorskip("gcsfs")
pytest.importorskip("google.cloud.storage")

MAIN = [sys.executable, "-m", "mnist_flax.main"]
LEASE_TTL_S = 4.0  # So that the rerun after SIGKILL waits seconds, not a minute.
# Sized for a machine 3x slower than a busy 2-core one, where a pod's start to its second
# checkpoint took 85 s and each start of the pod, or the single-process run, 65-90 s.
WAIT_S = 600  # Start to a checkpoint.
RUN_S = 900  # A whole start, to its exit.


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not unshare_works(), reason="needs `unshare -m` (root or user namespaces) for private mounts")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(idx_dir, epochs: int) -> list[str]:
    return [f"--config.data_dir={idx_dir}", f"--config.num_epochs={epochs}",
            "--config.batch_size=32", "--config.verify_checksums=False", *TINY_FLAGS,
            "--config.checkpoint_every_steps=1", "--config.checkpoint_keep=2"]


def _host_env(devices: int) -> dict[str, str]:
    """A CPU host with `devices` devices (what a GPU or TPU host has by itself), and gloo for the
    CPU collectives across processes (JAX's default today; named so that a change of default
    cannot break the pod)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "XLA_FLAGS": device_flags(devices),
            "MNIST_DATA_DIR": ""}


def _start_pod(scratch, env: dict, workdir: str, config: list[str]) -> list[subprocess.Popen]:
    """Two hosts: each mounts a fresh tmpfs on `scratch` (its own; the other cannot see it) and
    runs main as a user would start it on each host of a cluster without a cluster manager."""
    port = _port()
    procs = []
    for process_id in range(2):
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs scratch "$0" && exec "$@"', str(scratch),
                   *MAIN, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={process_id}", f"--workdir={workdir}",
                   f"--lease_seconds={LEASE_TTL_S}", *config]
        procs.append(subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**_host_env(devices=2), **env, "TMPDIR": str(scratch)}))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = RUN_S) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs, strict=True)]


def _tails(results: list[tuple[int, str, str]], lines: int = 25) -> str:
    """Every process's exit status and last stderr lines, for an assertion's message: a pod that
    fails on a busy machine says why on each host, not only on the one asserted."""
    return "\n".join(f"--- process {i}: exit {code}\n" + "\n".join(err.splitlines()[-lines:])
                     for i, (code, _, err) in enumerate(results))


def _steps(workdir: str) -> list[int]:
    """The committed checkpoints' steps, listed afresh (gcsfs would serve a cached listing)."""
    from google.cloud import storage

    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    names = [b.name for b in storage.Client().list_blobs(bucket, prefix=f"{prefix}/checkpoints/")]
    return sorted(int(n.split("/")[-2]) for n in names
                  if n.endswith("/commit_success.txt") and n.split("/")[-2].isdigit())


def _params(workdir: str):
    import jax

    from mnist_flax import models
    from mnist_flax.run import integrity
    from mnist_flax.run import workdir as workdir_lib

    model = models.create_model(workdir_lib.read_config(workdir))
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)),
                                                 train=False))
    return integrity.restore_params(workdir, expected["params"])


def _checksums(params) -> list[float]:
    import jax

    return [float(np.abs(np.asarray(p)).sum()) for p in jax.tree.leaves(params)]


def _wait_for_step(procs: list[subprocess.Popen], workdir: str, step: int) -> None:
    """Until a checkpoint at `step` or later is committed; a host that exits first, or no such
    checkpoint within WAIT_S, fails with every host's stderr."""
    deadline = time.monotonic() + WAIT_S
    while not [s for s in _steps(workdir) if s >= step]:
        assert all(p.poll() is None for p in procs), _tails(_finish(procs))
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"no checkpoint at step {step} or later in {WAIT_S} s\n"
                        f"{_tails(_finish(procs))}")
        time.sleep(0.2)


def test_pod_on_a_bucket_survives_sigterm_and_sigkill_and_matches_one_process(
        gcs_emulator, gcs_bucket_path, idx_dir, tmp_path):  # noqa: F811
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    config = _config(idx_dir, epochs=2)  # 8 steps an epoch: 16 steps, a checkpoint every step.
    workdir = f"{gcs_bucket_path}/pod"

    # A preemption notice that reaches one host only: both stop after the same step, saved.
    procs = _start_pod(scratch, gcs_emulator.env, workdir, config)
    _wait_for_step(procs, workdir, 2)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs)
    for returncode, _, err in results:
        assert returncode == 143, _tails(results)
        assert "Traceback" not in err, _tails(results)
    stopped_at = _steps(workdir)[-1]
    assert f"saved the checkpoint at step {stopped_at};" in results[0][2], results[0][2][-3000:]
    assert stopped_at < 16, f"stopped after the run ended (step {stopped_at})"

    procs = _start_pod(scratch, gcs_emulator.env, workdir, config)
    _wait_for_step(procs, workdir, stopped_at + 2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for returncode, _, _ in _finish(procs):
        assert returncode == -signal.SIGKILL
    killed_at = _steps(workdir)[-1]
    assert killed_at < 16, f"killed after the run ended (step {killed_at})"

    time.sleep(LEASE_TTL_S + 1)  # Process 0's lease runs out: nobody releases it after SIGKILL.
    results = _finish(_start_pod(scratch, gcs_emulator.env, workdir, config))
    for returncode, _, _ in results:
        assert returncode == 0, _tails(results)
    assert "taking over the expired lease" in results[0][2]
    resumed = [line for line in results[0][2].splitlines() if "Resuming from" in line]
    assert resumed and int(resumed[0].split("step ")[1].split()[0]) >= killed_at
    params, step = _params(workdir)
    assert step == 16

    single = f"{gcs_bucket_path}/single"
    result = subprocess.run([*MAIN, f"--workdir={single}", *config], capture_output=True,
                            text=True, timeout=RUN_S, cwd=REPO,
                            env={**_host_env(devices=1), **gcs_emulator.env})
    assert result.returncode == 0, result.stderr[-3000:]
    single_params, single_step = _params(single)
    assert single_step == 16
    np.testing.assert_allclose(_checksums(params), _checksums(single_params), rtol=1e-4)


def test_pod_with_a_local_workdir_the_hosts_do_not_share_stops_with_one_line(idx_dir, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    workdir = scratch / "run"  # Each host sees its own tmpfs here.
    results = _finish(_start_pod(scratch, {}, str(workdir), _config(idx_dir, epochs=1)))
    expected = (f"error: --workdir={workdir} is not shared by the 2 processes: process(es) 1 "
                "cannot see what process 0 writes there, so they would not see its checkpoints; "
                "use a bucket all hosts reach, e.g. --workdir=gs://BUCKET/runs/NAME")
    for returncode, _, err in results:
        assert returncode == 1, _tails(results)
        assert expected in err.strip().splitlines()
        assert "Traceback" not in err
    assert not workdir.exists()  # Outside the hosts' namespaces nothing was written.
