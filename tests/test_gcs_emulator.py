"""The GCS stand-in works with every client the workdir goes through: epath, orbax, tensorboardX
(written) and TensorBoard's reader (read back)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import gcs_bucket_path, gcs_emulator  # noqa: F401 (fixtures)

pytest.importorskip("gcsfs")
pytest.importorskip("google.cloud.storage")


def test_epath_round_trip(gcs_bucket_path):  # noqa: F811
    from etils import epath

    root = epath.Path(gcs_bucket_path)
    (root / "d").mkdir(parents=True, exist_ok=True)
    (root / "d" / "config.json").write_text('{"seed": 0}')
    (root / "d" / "b.bin").write_bytes(b"\x00\x01")
    assert (root / "d" / "config.json").read_text() == '{"seed": 0}'
    assert (root / "d").is_dir() and not (root / "missing").exists()
    assert sorted(p.name for p in (root / "d").iterdir()) == ["b.bin", "config.json"]
    assert [p.name for p in root.glob("d/*.json")] == ["config.json"]
    root.rmtree()
    assert not (root / "d" / "config.json").exists()


def test_orbax_save_keep_restore(gcs_bucket_path):  # noqa: F811
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(2), enable_async_checkpointing=False)
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), position=ocp.JsonCheckpointHandler())
    directory = f"{gcs_bucket_path}/checkpoints"
    state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.asarray(0)}
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as manager:
        for step in (1, 2, 3):
            assert manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave({**state, "step": jnp.asarray(step)}),
                position=ocp.args.JsonSave({"step": step})))
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as manager:
        assert manager.all_steps() == [2, 3]
        restored = manager.restore(3, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), position=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(restored.state["w"], state["w"])
    assert int(restored.state["step"]) == 3 and restored.position == {"step": 3}


def test_an_upload_that_expects_100_continue_gets_it_before_sending_its_body(
        gcs_emulator, gcs_bucket_path):  # noqa: F811
    """curl (so tensorstore's checkpoint writes) sends `Expect: 100-continue` before an upload
    over 1 MiB and holds the body back until the server answers; one that never answers costs
    each save curl's one-second timeout."""
    import socket
    import urllib.parse

    from etils import epath

    url = urllib.parse.urlsplit(gcs_emulator.url)
    name = urllib.parse.quote(f"{gcs_bucket_path.split('/', 3)[3]}/big.bin", safe="")
    body = bytes(2 << 20)
    with socket.create_connection((url.hostname, url.port), timeout=30) as connection:
        connection.sendall((
            f"POST /upload/storage/v1/b/{gcs_emulator.bucket}/o?uploadType=media&name={name} "
            f"HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
        interim = connection.recv(64)  # Without the answer: a timeout, the server awaits the body.
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        connection.sendall(body)
        final = connection.makefile("rb").readline()
    assert final.split()[1] == b"200", final
    assert (epath.Path(gcs_bucket_path) / "big.bin").stat().length == len(body)


def test_tensorboardx_events_read_by_tensorboard(gcs_emulator, gcs_bucket_path):  # noqa: F811
    # In a process of its own: tensorboardX keeps every writer alive (atexit) and its GCS writer
    # uploads the file again when finally collected; in this process that would be after the
    # emulator stops, where the upload retries for 120 s.
    script = textwrap.dedent(f"""
        from tensorboardX import SummaryWriter
        writer = SummaryWriter({gcs_bucket_path + "/train"!r})
        for step in range(3):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
        writer.close()
        """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                   env={**os.environ, **gcs_emulator.env})
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(f"{gcs_bucket_path}/train")
    accumulator.Reload()
    assert [(e.step, round(e.value, 3)) for e in accumulator.Scalars("loss")] == [
        (0, 1.0), (1, 0.5), (2, 0.333)]


def test_the_developer_tool_prints_what_to_export_and_main_trains_on_it(idx_dir):
    """`python tests/gcs_emulator.py`, as the README's Testing section says: its export lines
    alone point main at the emulator; without TENSORSTORE_GCS_HTTP_URL main says what to export
    (tensorstore would send the checkpoints to the real GCS and wait out its retries)."""
    import re
    import signal

    from conftest import REPO, one_line, run_module, tiny_main_flags

    tool = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in tool.stdout:
            lines.append(line)
            if line.startswith("# Ctrl-C"):
                break
        exports = dict(line[len("export "):].strip().split("=", 1) for line in lines
                       if line.startswith("export "))
        assert set(exports) >= {"STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"}, lines
        workdir = f"{re.search(r'bucket (gs://[^;]+);', lines[0]).group(1)}/runs/tool"
        flags = tiny_main_flags(idx_dir, workdir)
        result = run_module("main", *flags, env=exports)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Test accuracy" in result.stdout

        half = {**exports, "TENSORSTORE_GCS_HTTP_URL": ""}
        assert one_line(run_module("main", *flags, env=half)) == (
            f"error: STORAGE_EMULATOR_HOST={exports['STORAGE_EMULATOR_HOST']} is set but "
            "TENSORSTORE_GCS_HTTP_URL is not, so checkpoints would not go to the emulator; export "
            f"TENSORSTORE_GCS_HTTP_URL={exports['STORAGE_EMULATOR_HOST']} (python "
            "tests/gcs_emulator.py prints every variable to export)")
    finally:
        tool.send_signal(signal.SIGTERM)
        tool.wait(timeout=30)


def test_a_file_the_emulator_writes_on_disk_holds_its_old_bytes_or_its_new_ones(
        tmp_path, monkeypatch):
    """The outage tests stop the emulator and start it again on the same data; stopped in the
    middle of rewriting its metadata file in place, it could not start again (JSONDecodeError)."""
    pytest.importorskip("gcp_storage_emulator")
    import gcs_emulator_server
    from gcp_storage_emulator import storage

    write = gcs_emulator_server._whole_on_disk(storage._FileStore.write_bytes)
    store = storage._FileStore(use_memory=False, root=tmp_path)
    write(store, ".meta", b'{"objects": 1}')

    def stopped(*args):  # The process stops after writing the new bytes, before they are in place.
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write(store, ".meta", b'{"objects": 2}')
    assert store.read_bytes(".meta") == b'{"objects": 1}'
    monkeypatch.undo()
    write(store, "bucket/a/b.bin", b"new")
    assert store.read_bytes("bucket/a/b.bin") == b"new"
