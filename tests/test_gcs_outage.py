"""A gs:// workdir whose storage goes away mid-run: the run stops with one line within seconds of
its lease running out (not after minutes of client retries), and once the storage answers again
the same command resumes from the last committed checkpoint."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO
from gcs_emulator import start
from test_gcs_workdir import TINY

pytest.importorskip("gcsfs")
pytest.importorskip("google.cloud.storage")

LEASE_SECONDS = 3.0  # The run gives up this long after its last renewal, plus half of it.


def _command(workdir: str, idx_dir) -> list[str]:
    return [sys.executable, "-m", "mnist_flax.main", f"--workdir={workdir}",
            f"--config.data_dir={idx_dir}", "--config.num_epochs=2",
            "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
            f"--lease_seconds={LEASE_SECONDS}", *TINY]


def _failed(process: subprocess.Popen, lines: list[str], rest: str) -> tuple[str, str]:
    """(the whole log, its last line) of a run that must have failed with one line."""
    log = "".join(lines) + rest
    assert process.returncode == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    return log, log.strip().splitlines()[-1]


def test_storage_going_away_stops_the_run_with_one_line_and_it_resumes_later(idx_dir, tmp_path):
    data = tmp_path / "bucket"  # On disk, so that a restarted emulator serves the same objects.
    emulator = start(tmp_path / "emulator.log", data_dir=data)
    workdir = f"gs://{emulator.bucket}/run"
    env = {"MNIST_DATA_DIR": "", **emulator.env}
    process = subprocess.Popen(_command(workdir, idx_dir), cwd=REPO, text=True,
                               env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = []
    try:
        for line in process.stderr:  # Step 7 logged: the save at step 6 has started, so the
            log.append(line)  # one at step 4 is committed (saves are asynchronous).
            if re.search(r"step ([7-9]|\d\d+)/", line):
                break
        else:
            pytest.fail("".join(log[-30:]))
        emulator.stop()
        stopped = time.monotonic()
        _, rest = process.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        process.kill()
        emulator.stop()
    log, last = _failed(process, log, rest)
    assert last.startswith(f"error: the workdir's storage stopped answering (the lease on "
                           f"--workdir={workdir} could not be renewed before "), last
    assert last.endswith("the last committed checkpoint is intact; run the same command again "
                         "when it answers"), last
    assert took < 30, f"stopped {took:.0f} s after the storage went away"
    print(f"stopped {took:.1f} s after the storage went away")

    port = int(emulator.url.rsplit(":", 1)[1])  # The storage is back, at the same address.
    emulator = start(tmp_path / "emulator.log", data_dir=data, port=port)
    try:
        resumed = subprocess.run(
            _command(workdir, idx_dir), cwd=REPO, text=True, capture_output=True, timeout=300,
            env={**os.environ, "MNIST_DATA_DIR": "", **emulator.env})
    finally:
        emulator.stop()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(re.search(r"Resuming from the checkpoint at step (\d+)", resumed.stderr).group(1))
    assert step >= 4, resumed.stderr[-3000:]


def test_storage_that_does_not_answer_from_the_start_is_one_line(idx_dir, tmp_path):
    """main and predict against a gs:// endpoint where nothing listens: after the clients' own
    retries (about half a minute, gcsfs's), one line each, no traceback, no local 'gs:' dir."""
    with socket.socket() as s:  # A port nobody listens on.
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "MNIST_DATA_DIR": "", "STORAGE_EMULATOR_HOST": url,
           "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    workdir = "gs://some-bucket/runs/a"
    commands = {"main": _command(workdir, idx_dir),
                "predict": [sys.executable, "-m", "mnist_flax.predict", f"--workdir={workdir}",
                            str(tmp_path / "digit.png")]}
    processes = {name: subprocess.Popen(command, cwd=REPO, env=env, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for name, command in commands.items()}  # Both wait out their retries at once.
    for name, process in processes.items():
        _, err = process.communicate(timeout=240)
        assert process.returncode == (1 if name == "main" else 2), err[-3000:]
        assert "Traceback" not in err and "out of retries" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: --workdir={workdir}: its storage did not answer ("), last
        assert last.endswith("); check the network and the bucket, then run again"), last
    assert not (REPO / "gs:").exists()  # Nothing was written as a local path.


def test_a_lease_taken_over_during_async_saves_stops_the_run_and_nothing_lands_after(
        idx_dir, tmp_path, monkeypatch):
    """With a save into gs:// in flight at every step, another run takes the lease over: the run
    stops with one line once it sees that, and no save of its own starts after that moment (the
    one in flight then may land: a save is checked against the lease before it starts). A save
    starts after its step's progress line, so what lands late must be of a step logged before
    the loss was: its files' times cannot tell, as on a busy machine a save started before the
    loss may write its first file after it."""
    import datetime
    import json

    from google.cloud import storage

    emulator = start(tmp_path / "emulator.log")
    workdir = f"gs://{emulator.bucket}/run"
    env = {**os.environ, "MNIST_DATA_DIR": "", **emulator.env}
    command = [*_command(workdir, idx_dir), "--config.checkpoint_every_steps=1"]
    process = subprocess.Popen(command, cwd=REPO, text=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = []
    try:
        for line in process.stderr:  # Checkpoints are being saved, one per step.
            log.append(line)
            if re.search(r"step ([4-9]|\d\d+)/", line):
                break
        else:
            pytest.fail("".join(log[-30:]))
        for name, value in emulator.env.items():  # Over a session emulator's, if any.
            monkeypatch.setenv(name, value)
        bucket = storage.Client().bucket(emulator.bucket)
        # What another run does when it judges the lease expired (its clock runs ahead, say).
        bucket.blob("run/.lock").upload_from_string(json.dumps(
            {"host": "elsewhere", "pid": 1, "token": "other", "expires": time.time() + 600}))
        seen = None
        for line in process.stderr:
            log.append(line)
            if "lost the lease on " in line:  # The run has seen it: nothing of its own after.
                seen = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017
                reached = max(int(m[1]) for m in re.finditer(r"step (\d+)/", "".join(log)))
                break
        _, rest = process.communicate(timeout=120)
        time.sleep(2)  # Anything still in flight would land now.
        blobs = [b for b in bucket.list_blobs(prefix="run/") if b.name != "run/.lock"]
    finally:
        process.kill()
        emulator.stop()
    log, last = _failed(process, log, rest)
    assert last == (
        f"error: another run took over the lease on --workdir={workdir}; this run saves no more "
        "and stops; its last committed checkpoint is intact"), log[-3000:]
    steps: dict[str, list[datetime.datetime]] = {}
    for blob in blobs:
        steps.setdefault(blob.name.split("/")[2] if "/checkpoints/" in blob.name else blob.name,
                         []).append(blob.updated)
    assert seen is not None, log[-3000:]
    late = {step: times for step, times in steps.items() if max(times) > seen}
    assert len(late) <= 1, late  # At most the save in flight when the run saw the loss ...
    assert all(step.isdigit() and int(step) <= reached for step in late), (late, reached)
