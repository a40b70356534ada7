"""`--config.profile_steps`: a trace of a few steps that TensorBoard's profile tab lists, and a
trace that cannot be written is a warning, never a failed run. (gs://: test_gcs_workdir.)"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import run_module, tiny_main_flags

pytest.importorskip("xprof")  # The `profile` extra (also in `test`).


def _runs_in_profile_tab(logdir, timeout_s: float = 180) -> list[str]:
    """`tensorboard --logdir=LOGDIR` started as a server; what its profile plugin lists."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
                               f"--port={port}", "--host=127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/data/plugin/profile/runs", timeout=10) as r:
                    body = r.read()
                    if r.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    return json.loads(body)
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        raise AssertionError(f"TensorBoard did not answer in {timeout_s} s")
    finally:
        server.kill()
        server.wait()


def test_a_profile_of_a_few_steps_shows_in_tensorboards_profile_tab(idx_dir, tmp_path):
    workdir = tmp_path / "runs" / "profiled"
    result = run_module("main", *tiny_main_flags(idx_dir, workdir, "--config.profile_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    sessions = list((workdir / "plugins" / "profile").iterdir())
    assert len(sessions) == 1 and list(sessions[0].glob("*.xplane.pb")), sessions
    assert _runs_in_profile_tab(tmp_path / "runs") == [f"profiled/{sessions[0].name}"]


def test_a_profile_that_cannot_be_written_is_a_warning_and_the_run_goes_on(idx_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "plugins").write_text("not a directory")  # Root ignores permissions; not this.
    result = run_module("main", *tiny_main_flags(idx_dir, workdir, "--config.profile_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The profile could not be written to" in result.stderr
    assert "Test accuracy: " in result.stdout
