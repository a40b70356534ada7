"""A gs:// workdir end to end, against the GCS emulator: `mnist_flax.main` trains, keeps N
checkpoints, writes config.json and events TensorBoard reads, resumes (past a damaged checkpoint,
which it moves aside), and `mnist_flax.predict` and `mnist_flax.sweep` use it; the lock is a
lease; every bad case (a missing bucket, one it may not write) is one line."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import TINY_FLAGS, run_module
from gcs_emulator import gcs_bucket_path, gcs_emulator, separate_emulator  # noqa: F401 (fixtures)

pytest.importorskip("gcsfs")
pytest.importorskip("google.cloud.storage")

from etils import epath  # noqa: E402

from mnist_flax import configs, sweep_results  # noqa: E402
from mnist_flax.run import lease  # noqa: E402
from mnist_flax.run import workdir as workdir_lib  # noqa: E402

TINY = [*TINY_FLAGS, "--config.batch_size=32", "--config.verify_checksums=False"]


def _main(emulator, *args: str, timeout: int = 300):
    return run_module("main", *args, *TINY, env=emulator.env, timeout=timeout)


def _last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def _digit_png(tmp_path):
    from PIL import Image

    image = tmp_path / "digit.png"
    one = np.zeros((28, 28), np.uint8)
    one[4:24, 13:16] = 255  # A "1".
    Image.fromarray(one).save(image)
    return image


def test_train_keep_resume_predict_and_tensorboard_on_gs(gcs_emulator, gcs_bucket_path,  # noqa: F811
                                                         idx_dir, tmp_path):
    workdir = gcs_bucket_path
    result = _main(gcs_emulator, f"--workdir={workdir}", f"--config.data_dir={idx_dir}",
                   "--config.num_epochs=2", "--config.checkpoint_keep=2",
                   "--config.checkpoint_every_steps=4", "--config.profile_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    root = epath.Path(workdir)
    traces = list((root / "plugins" / "profile").iterdir())  # --config.profile_steps, on gs://.
    assert len(traces) == 1 and list(traces[0].glob("*.xplane.pb")), traces
    assert json.loads((root / "config.json").read_text())["num_epochs"] == 2
    assert sorted(int(p.name) for p in (root / "checkpoints").iterdir() if p.name.isdigit()) == [
        12, 16]  # Keep-2 of 4, 8, 12, 16.
    assert not (root / ".lock").exists()  # The lease is released at the end.
    assert list(root.glob("events.out.tfevents.*"))

    # A second start with one more epoch resumes from step 16 (the same command + an override).
    result = _main(gcs_emulator, f"--workdir={workdir}", f"--config.data_dir={idx_dir}",
                   "--config.num_epochs=3", "--config.checkpoint_keep=2",
                   "--config.checkpoint_every_steps=4", "--config.profile_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint at step 16" in result.stderr
    assert list((root / "plugins" / "profile").iterdir()) == traces  # Traced once, not again.

    from tensorboard.backend.event_processing import event_multiplexer

    events = event_multiplexer.EventMultiplexer()
    events.AddRunsFromDirectory(workdir)  # As `tensorboard --logdir=gs://...` finds the run.
    events.Reload()
    assert sorted(events.Runs()) == [".", "test", "train"]  # The run and its Keras-style halves.
    assert [e.step for e in events.Scalars("test", "accuracy")] == [8, 16, 24]
    # HParams: one row, the values the run ended with (not its first start's), and its data.
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    assert len(list(root.glob("events.out.tfevents.*"))) == 1  # The last start's only.
    start = hparams_metadata.parse_session_start_info_plugin_data(events.SummaryMetadata(
        ".", hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
    assert start.hparams["num_epochs"].string_value == "3"
    assert start.hparams["data"].string_value.startswith(f"idx ({idx_dir}): ")

    result = run_module("predict", f"--workdir={workdir}", str(_digit_png(tmp_path)), "--json",
                        env=gcs_emulator.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["step"] == 24


def _blobs(workdir: str, under: str) -> dict[str, bytes]:
    """The objects under workdir/under: {name relative to it: contents}."""
    from google.cloud import storage

    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    prefix = f"{prefix}/{under}/"
    return {blob.name[len(prefix):]: blob.download_as_bytes()
            for blob in storage.Client().list_blobs(bucket, prefix=prefix)}


def test_a_damaged_checkpoint_on_gs_is_moved_aside_and_the_run_resumes(
        gcs_emulator, gcs_bucket_path, idx_dir):  # noqa: F811
    from google.cloud import storage

    args = [f"--workdir={gcs_bucket_path}", f"--config.data_dir={idx_dir}",
            "--config.num_epochs=1", "--config.checkpoint_every_steps=2",
            "--config.checkpoint_keep=3"]  # 8 steps: checkpoints 4, 6, 8 kept.
    result = _main(gcs_emulator, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    before = _blobs(gcs_bucket_path, "checkpoints/8")
    # Garbage over the largest array data object of the newest checkpoint, as a bad copy would.
    name = max((n for n in before if "/d/" in n), key=lambda n: len(before[n]))
    garbage = np.random.default_rng(0).integers(0, 256, len(before[name]), np.uint8).tobytes()
    bucket, _, prefix = gcs_bucket_path[len("gs://"):].partition("/")
    storage.Client().bucket(bucket).blob(f"{prefix}/checkpoints/8/{name}").upload_from_string(
        garbage)
    before[name] = garbage

    result = _main(gcs_emulator, *args)  # The same command again.
    assert result.returncode == 0, result.stderr[-3000:]
    # Its only warnings: skipping it, and moving it aside (a rename, which gcsfs does with
    # objects.move: where that fails it logs a warning and a traceback per file).
    warnings = [line for line in result.stderr.splitlines() if re.match(r"[WEF]\d{4} ", line)]
    assert len(warnings) == 2, warnings
    assert "Traceback" not in result.stderr
    assert "skipping the damaged checkpoint at step 8: " in warnings[0]
    assert "Moved the damaged checkpoint at step 8 aside to " in warnings[1]
    assert "Resuming from the checkpoint at step 6 " in result.stderr
    root = epath.Path(gcs_bucket_path, "checkpoints")
    aside = [p.name for p in root.iterdir() if p.name.startswith("damaged-")]
    assert len(aside) == 1 and aside[0].startswith("damaged-8-"), aside
    assert _blobs(gcs_bucket_path, f"checkpoints/{aside[0]}") == before  # All of it, as it was.
    assert sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) == [4, 6, 8]


def test_sweep_into_a_gs_parent(gcs_emulator, gcs_bucket_path, idx_dir):  # noqa: F811
    result = run_module("sweep", f"--workdir={gcs_bucket_path}", "--sweep=seed=1,2",
                        f"--config.data_dir={idx_dir}", "--config.num_epochs=1", *TINY,
                        f"--results={gcs_bucket_path}/results.json", env=gcs_emulator.env)
    assert result.returncode == 0, result.stderr[-3000:]
    root = epath.Path(gcs_bucket_path)
    assert len(json.loads((root / "results.json").read_text())["runs"]) == 2
    for name in ("seed=1", "seed=2"):
        assert (root / name / "config.json").exists()
        assert list((root / name / "checkpoints").iterdir())


def test_second_run_on_a_held_bucket_workdir_is_one_line(gcs_emulator, gcs_bucket_path,  # noqa: F811
                                                         idx_dir):
    with lease.acquire(gcs_bucket_path, ttl_s=60):
        result = _main(gcs_emulator, f"--workdir={gcs_bucket_path}",
                       f"--config.data_dir={idx_dir}", "--config.num_epochs=1")
    assert result.returncode == 1
    line = _last_line(result)
    assert line.startswith(f"error: another run (host {os.uname().nodename}, pid {os.getpid()}) "
                           f"holds the lease on --workdir={gcs_bucket_path} until ")
    assert line.endswith("wait for it or use another workdir")
    assert "Traceback" not in result.stderr
    assert not epath.Path(gcs_bucket_path, "checkpoints").exists()


def test_missing_bucket_is_one_line(gcs_emulator, idx_dir):  # noqa: F811
    result = _main(gcs_emulator, "--workdir=gs://no-such-bucket-mnist/runs/a",
                   f"--config.data_dir={idx_dir}", "--config.num_epochs=1", timeout=120)
    assert result.returncode == 1
    assert _last_line(result) == (
        "error: --workdir=gs://no-such-bucket-mnist/runs/a: cannot write there (bucket "
        "no-such-bucket-mnist does not exist); create the bucket (gcloud storage buckets create "
        "gs://BUCKET) or pick one this machine's service account can write")


def test_a_bucket_that_cannot_be_written_is_one_line_and_loses_nothing(tmp_path, idx_dir,
                                                                       monkeypatch):
    # A run trained in the bucket; then the bucket is served again with every write answered
    # 403, as GCS answers credentials without storage.objects.create.
    from google.cloud import storage

    data = tmp_path / "bucket"
    with separate_emulator(tmp_path, data_dir=data) as emulator:
        workdir = f"gs://{emulator.bucket}/runs/a"
        args = [f"--workdir={workdir}", f"--config.data_dir={idx_dir}", "--config.num_epochs=1"]
        assert _main(emulator, *args).returncode == 0
    with separate_emulator(tmp_path, data_dir=data, read_only=True) as emulator:
        for name, value in emulator.env.items():
            monkeypatch.setenv(name, value)

        def objects():
            return {b.name: (b.generation, b.md5_hash)
                    for b in storage.Client().list_blobs(emulator.bucket)}

        before = objects()
        result = _main(emulator, *args, "--config.num_epochs=2", timeout=120)
        assert objects() == before and any("/checkpoints/8/" in name for name in before)
        predicted = run_module("predict", f"--workdir={workdir}", str(_digit_png(tmp_path)),
                               "--json", env=emulator.env)
    assert result.returncode == 1
    account = "emulator@mnist-flax-test.iam.gserviceaccount.com"  # As the emulator names it.
    assert _last_line(result) == (
        f"error: --workdir={workdir}: cannot write there (403 Forbidden: {account} lacks "
        f"storage.objects.create on bucket {emulator.bucket}); grant write access (gcloud storage "
        f"buckets add-iam-policy-binding gs://{emulator.bucket} --member=serviceAccount:{account} "
        "--role=roles/storage.objectAdmin) or pick another bucket")
    assert "Traceback" not in result.stderr
    assert predicted.returncode == 0, predicted.stderr[-3000:]  # Reading needs no write.
    assert json.loads(predicted.stdout)["step"] == 8


# Runs main as if gcsfs and google-cloud-storage were not installed.
WITHOUT_GCS = """
import runpy, sys
for name in ("gcsfs", "google.cloud.storage"):
    sys.modules[name] = None  # find_spec says absent; import raises ImportError.
sys.argv[0] = "mnist_flax.{module}"
runpy.run_module("mnist_flax.{module}", run_name="__main__")
"""


@pytest.mark.parametrize("module", ["main", "predict"])
def test_gs_workdir_without_the_gcs_extra_is_one_line(module, tmp_path):
    args = ["--workdir=gs://bucket/runs/a"] + (["image.png"] if module == "predict" else [])
    result = run_module(module, *args, script=WITHOUT_GCS.format(module=module), timeout=120)
    assert result.returncode in (1, 2)
    assert _last_line(result) == (
        "error: --workdir=gs://bucket/runs/a: a gs:// workdir needs gcsfs and "
        "google.cloud.storage, which the gcs extra installs: pip install 'mnist_flax[gcs]'")
    assert "Traceback" not in result.stderr


def test_gs_results_without_the_gcs_extra_is_one_line_naming_the_flag(monkeypatch):
    monkeypatch.setattr(workdir_lib, "_installed", lambda module: False)
    with pytest.raises(configs.UserError) as refused:
        sweep_results.check_results("gs://bucket/results.json")
    assert str(refused.value) == (
        "--results=gs://bucket/results.json: a gs:// workdir needs gcsfs and "
        "google.cloud.storage, which the gcs extra installs: pip install 'mnist_flax[gcs]'")



def test_sigterm_while_an_async_save_is_in_flight_saves_it_and_resumes_bit_identically(
        gcs_emulator, gcs_bucket_path, idx_dir, tmp_path, monkeypatch):  # noqa: F811
    """Saves are asynchronous: SIGTERM arriving while one is written still exits as preempted
    (143) with the step it stopped at committed, and the rerun ends bit-identical. The emulator
    is paused (SIGSTOP) from the moment the save at step 3 returns until a second later, so that
    save is still being written when the signal comes, however fast the machine."""
    import signal
    import threading

    import jax
    from conftest import assert_trees_identical, tiny_config, train_as_main

    from mnist_flax import checkpoints, train
    from mnist_flax.run import operations, signals

    config = tiny_config(data_source="idx", data_dir=str(idx_dir), batch_size=32, num_epochs=1,
                         checkpoint_every_steps=1, verify_checksums=False)
    expected, _ = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
    emulator, in_flight, save = gcs_emulator.process.pid, [], checkpoints.save

    def save_then_sigterm(manager, state, position):
        started = save(manager, state, position)
        if position["step"] == 3:  # Its files are being written now: hold them there.
            os.kill(emulator, signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (emulator, signal.SIGCONT)).start()
            in_flight.append(manager.is_saving_in_progress())
            os.kill(os.getpid(), signal.SIGTERM)
        return started

    try:
        with monkeypatch.context() as patched:
            patched.setattr(checkpoints, "save", save_then_sigterm)
            with pytest.raises(signals.Preempted) as stopped, \
                    operations.held(gcs_bucket_path, config) as hooks:
                train.train_and_evaluate(config, gcs_bucket_path, hooks)
    finally:
        os.kill(emulator, signal.SIGCONT)
    assert in_flight == [True]  # The signal came while the save at step 3 was being written.
    assert (stopped.value.step, stopped.value.exit_code) == (4, 143)
    assert checkpoints.latest_step(gcs_bucket_path) == 4  # Committed before it returned.

    state, _ = train_as_main(config, gcs_bucket_path)
    host = jax.tree.map(np.asarray, checkpoints.state_tree(state))
    assert_trees_identical(host, jax.tree.map(np.asarray, checkpoints.state_tree(expected)))


def test_the_next_commands_main_prints_work_as_printed_on_gs(gcs_emulator, gcs_bucket_path,  # noqa: F811
                                                              idx_dir, tmp_path):
    """main's closing `Next:` lines on a gs:// workdir, run as printed (a real digit for
    my_digit.png; TensorBoard on a free port): TensorBoard serves the run with its HParams row,
    and predict answers."""
    import shlex

    from test_summaries import get_json, tensorboard_server

    workdir = f"{gcs_bucket_path}/run"
    result = _main(gcs_emulator, f"--workdir={workdir}", f"--config.data_dir={idx_dir}",
                   "--config.num_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("Next:"))
    tensorboard, predict = (shlex.split(line) for line in lines[start + 1:start + 3])
    assert tensorboard[0] == "tensorboard" and "--load_fast=false" in tensorboard, tensorboard
    with tensorboard_server("", {"run", "run/train", "run/test"}, timeout_s=120,
                            args=tensorboard[1:]) as url:
        groups = get_json(f"{url}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [],
            "startIndex": 0, "sliceSize": 10})
        [group] = groups["sessionGroups"]
        assert group["hparams"]["num_epochs"] == "1", group
        assert group["metricValues"], group  # Its metric columns are filled.

    assert predict[:3] == ["python", "-m", "mnist_flax.predict"], predict
    answer = run_module("predict", *predict[3:-1], str(_digit_png(tmp_path)),
                        env=gcs_emulator.env)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip(), answer.stderr[-3000:]
