"""A local GCS stand-in for tests: gcp-storage-emulator in a subprocess on a free loopback port.

Import the fixtures into a test module (`from gcs_emulator import gcs_bucket_path, gcs_emulator`).
The session fixture `gcs_emulator` starts the emulator once, points every client at it through
the environment and stops the emulator (by its own pid) at the end; `gcs_bucket_path` gives each
test a fresh `gs://BUCKET/<test>-<random>` prefix. Tests skip when gcp-storage-emulator is absent.

The clients and what points them at the emulator (`GcsEmulator.env`, also for subprocesses):
google-cloud-storage, gcsfs (so etils.epath), tensorboardX's writer and TensorBoard's reader read
STORAGE_EMULATOR_HOST; tensorstore (orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL and takes its
token from GOOGLE_AUTH_TOKEN_FOR_TESTING; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false stops gcsfs
from probing the bucket type over gRPC first. gcsfs reads that last one when it is first imported.

The emulator runs as gcs_emulator_server.py extends it: with generation headers on downloads
(which tensorstore needs), generation preconditions checked as GCS checks them (412, so of two
runs creating the same object with `ifGenerationMatch=0` one loses), `moveTo` (so a gcsfs rename
is a fast copy and delete), files on disk written whole (so one stopped mid-write starts again
on its data) and, with `read_only=True`, a bucket whose writes answer 403 as GCS
answers a service account without write permission. It serves one request at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "mnist-flax-test"
# Read by gcsfs when it is imported, which may be before any fixture runs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
START_TIMEOUT_S = 30.0
# The emulator's command line, with the generation headers tensorstore needs (see that file).
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py")


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: its base `url`, its default `bucket`, the `env` that points clients at
    it, and the subprocess (`process`) that serves it."""

    url: str
    bucket: str
    env: dict[str, str]
    process: subprocess.Popen

    def stop(self) -> None:
        """Stops the emulator (idempotent); a test that needs the service to vanish calls this."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def start(log_path: os.PathLike, bucket: str = BUCKET, read_only: bool = False,
          data_dir: os.PathLike | None = None, port: int | None = None) -> GcsEmulator:
    """Starts an emulator with `bucket` (where every write answers 403 Forbidden if `read_only`)
    and waits until it answers; its output goes to `log_path`. It keeps its objects in memory, or
    in `data_dir`, where the next emulator started on it finds them; start that one on the same
    `port` when clients reload objects (the emulator stores each download link with its address).
    Raises RuntimeError, with the log's tail, if it exits or stays silent."""
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    storage = ["--in-memory"] if data_dir is None else []
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, SERVER, *([f"--data-dir={data_dir}"] if data_dir else []), "start",
             "--host=127.0.0.1", f"--port={port}", *storage, f"--default-bucket={bucket}",
             "--quiet", *([f"--read-only-bucket={bucket}"] if read_only else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    emulator = GcsEmulator(url=url, bucket=bucket, process=process, env={
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    })
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(f"{url}/storage/v1/b/{bucket}"):
        if process.poll() is not None or time.monotonic() > deadline:
            emulator.stop()
            with open(log_path, errors="replace") as log:
                tail = log.read()[-2000:]
            raise RuntimeError(f"gcp-storage-emulator did not start on {url}:\n{tail}")
        time.sleep(0.1)
    return emulator


def _clear_gcsfs_instances() -> None:
    """fsspec caches filesystem objects (and their listings): drop those made for another host."""
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """One emulator for the session, with its env vars set in os.environ until the session ends."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.skip("gcp-storage-emulator is not installed (pip install -e .[test,gcs])")
    emulator = start(tmp_path_factory.mktemp("gcs_emulator") / "emulator.log")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in emulator.env.items():
                mp.setenv(name, value)
            _clear_gcsfs_instances()
            yield emulator
        _clear_gcsfs_instances()
    finally:
        emulator.stop()


@pytest.fixture
def gcs_bucket_path(gcs_emulator: GcsEmulator, request: pytest.FixtureRequest) -> str:
    """A fresh `gs://BUCKET/<test name>-<random>` prefix (nothing is under it yet)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return f"gs://{gcs_emulator.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def separate_emulator(tmp_path: os.PathLike, read_only: bool = False,
                      data_dir: os.PathLike | None = None) -> Iterator[GcsEmulator]:
    """An emulator of its own, for a test that stops it, needs its bucket `read_only` or its
    objects kept in `data_dir` (see `start`); env vars are the caller's to set."""
    emulator = start(os.path.join(tmp_path, "emulator.log"), read_only=read_only,
                     data_dir=data_dir)
    try:
        yield emulator
    finally:
        emulator.stop()


def main() -> None:
    """`python tests/gcs_emulator.py [--data_dir=DIR] [--port=N]`: an emulator until Ctrl-C, and
    the `export` lines that point main, predict, sweep and TensorBoard at it from another shell."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data_dir", help="keep the objects here (default: in memory)")
    parser.add_argument("--port", type=int, help="default: a free one")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill stops it as Ctrl-C does.
    with tempfile.TemporaryDirectory() as tmp:
        emulator = start(os.path.join(tmp, "emulator.log"), data_dir=args.data_dir,
                         port=args.port)
        try:
            print(f"# gcp-storage-emulator at {emulator.url}, bucket gs://{emulator.bucket}; "
                  "in another shell:")
            for name, value in emulator.env.items():
                print(f"export {name}={value}")
            print(f"# python -m mnist_flax.main --workdir=gs://{emulator.bucket}/runs/a")
            print("# Ctrl-C here stops the emulator.", flush=True)
            emulator.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            emulator.stop()


if __name__ == "__main__":
    main()
