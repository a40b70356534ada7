"""Reliability: a full disk and a NaN loss mid-run, reproducibility, one run per workdir, and bad
input not covered elsewhere. Each failure is one line (no traceback) and keeps the last good
checkpoint; a run restarted after it finishes exactly as an uninterrupted one.

Covered elsewhere: kill -9 / SIGTERM / Ctrl-C then resume, and a kill during a save
(test_checkpoints.py); damaged checkpoints, config.json and lock files (test_damage.py);
bad flags and config values (test_main.py); IDX errors and fuzzing (test_input_pipeline.py);
images that are not images (test_predict.py).

Every run here is the same tiny model on 160 synthetic digits (batch 16: 10 steps an epoch, 2
epochs, a checkpoint every 3 steps), so in-process runs share one compiled step and subprocesses
share one compilation cache.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import conftest
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    REPO,
    TIMING_METRICS,
    TINY_MODEL,
    assert_trees_identical,
    load_config,
    run_module,
    snapshot,
    tiny_config,
    write_idx_dir,
)
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins.hparams import metadata as hparams_metadata

from mnist_flax import (
    checkpoints,
    configs,
    event_reader,
    input_pipeline,
    mnist_tfds,
    pictures,
    progress,
    train,
)
from mnist_flax.input_pipeline import DataError
from mnist_flax.run import lock as lock_lib
from mnist_flax.run import operations
from mnist_flax.run import workdir as workdir_lib

NUM_TRAIN, NUM_TEST = 160, 32
NUM_STEPS = NUM_TRAIN // 16 * 2
TINY = {**TINY_MODEL, "batch_size": 16, "num_epochs": 2,
        "eval_batch_size": 32, "log_every_steps": 100, "checkpoint_every_steps": 3,
        "data_source": "idx", "verify_checksums": False}


def small_config(data_dir, **overrides):
    return tiny_config(**{**TINY, "data_dir": str(data_dir), **overrides})


def tiny_flags(data_dir, workdir, *extra: str, **overrides) -> list[str]:
    """The command line that gives `small_config(data_dir, **overrides)`."""
    flags = [f"--config.{k}={'(' + ','.join(map(str, v)) + ')' if isinstance(v, tuple) else v}"
             for k, v in {**TINY, **overrides}.items()]
    return [f"--workdir={workdir}", f"--config.data_dir={data_dir}", *flags, *extra]


def host_tree(state) -> dict:
    return jax.tree.map(np.asarray, checkpoints.state_tree(state))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability")
    write_idx_dir(base / "data", n_train=NUM_TRAIN, n_test=NUM_TEST)
    return base


def run_main(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m mnist_flax.main` (or `script` standing in for it), on the CPU; it caches its
    compilations in the session's cache (conftest)."""
    return run_module("main", *args, env={"JAX_PLATFORMS": "cpu"}, script=script)


@pytest.fixture(scope="module")
def reference(base):
    """An uninterrupted in-process run (seed 0): its final state and metrics."""
    state, metrics = train.train_and_evaluate(small_config(base / "data"),
                                              str(base / "reference"))
    return host_tree(state), metrics


# ---------------------------------------------------------------------------------------------
# Reproducibility.


def saved_state(workdir, step: int) -> dict:
    """The checkpoint at `step` as numpy arrays, read without building a model."""
    manager = checkpoints.create_manager(str(workdir), 1, read_only=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"])


def deterministic(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def test_same_seed_and_config_give_bit_identical_params_and_metrics(base, reference):
    expected, expected_metrics = reference
    state, metrics = train.train_and_evaluate(small_config(base / "data"), str(base / "again"))
    assert_trees_identical(host_tree(state), expected)
    assert deterministic(metrics) == deterministic(expected_metrics)  # Exact floats.


def test_another_seed_gives_another_run(nan_run, disk_full_run):
    """Step 3 of the seed-7 run (nan_run) against step 3 of the seed-0 run (disk_full_run)."""
    seed7, seed0 = saved_state(nan_run[0], 3), disk_full_run[1]
    pairs = zip(jax.tree.leaves(seed7["params"]), jax.tree.leaves(seed0["params"]), strict=True)
    assert not any(np.array_equal(a, b) for a, b in pairs)  # Every parameter differs.
    assert not np.array_equal(seed7["dropout_key"], seed0["dropout_key"])


# ---------------------------------------------------------------------------------------------
# A NaN loss: the run stops before saving the diverged state; the last good checkpoint stays.


# main, with the parameters poisoned just before step 5 (1-based) by the step function itself, so
# its loss is NaN: the step is patched, as a fault comes from inside the step.
_MAIN_WITH_NAN_AT_STEP_5 = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from absl import app
    from mnist_flax import main, train
    from mnist_flax.run import boundary

    real_step = train.train_step_fn

    def poisoned_step(state, batch):
        params = jax.tree.map(lambda p: jnp.where(state.step == 4, p * jnp.nan, p), state.params)
        return real_step(state.replace(params=params), batch)

    train.train_step_fn = poisoned_step
    main.define_flags()
    app.run(main.main, flags_parser=boundary.parse_flags)
""")


@pytest.fixture(scope="module")
def nan_run(base):
    """The CLI with the loss made NaN at step 5: checkpoints come every 3 steps and progress
    lines (the only other loss check) every 100, so only the check before a save can stop it."""
    workdir = base / "nan"
    result = run_main(*tiny_flags(base / "data", workdir, "--config.seed=7"),
                      script=_MAIN_WITH_NAN_AT_STEP_5)
    return workdir, result


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(nan_run):
    workdir, result = nan_run
    last = one_line_error(result)
    assert "training loss became nan at step 5; stopped without saving it" in last
    assert checkpoints.latest_step(str(workdir)) == 3  # Step 6 (NaN) was never written.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_state(workdir, 3)))


def test_the_seed_is_logged_and_written_to_tensorboard(nan_run):
    workdir, result = nan_run
    assert "seed: 7" in result.stderr  # main logs the whole config.
    events = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "seed: 7" in config_text

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(workdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(workdir))
    tags = provider.list_tensors(RequestContext(), experiment_id="",
                                 plugin_name=hparams_metadata.PLUGIN_NAME)["."]
    start = hparams_metadata.parse_session_start_info_plugin_data(
        tags[hparams_metadata.SESSION_START_INFO_TAG].plugin_content)
    assert start.hparams["seed"].string_value == "7"  # Integers as text (summaries).


def test_bad_input_on_an_existing_workdir_changes_nothing_in_it(base, nan_run):
    workdir, _ = nan_run
    before = snapshot(workdir)
    result = run_main(*tiny_flags(base / "data", workdir, "--config.seed=7"),
                      "--config.batch_size=1000")  # Larger than the 160 training images.
    assert "larger than the 160 training images" in one_line_error(result)
    assert snapshot(workdir) == before


def test_a_nan_parameter_with_a_finite_loss_is_not_saved_either():
    pending = [{"loss": np.float32(0.5)}, {"loss": np.float32(np.inf)}]
    fine = types.SimpleNamespace(params={"Dense_0": {"kernel": np.ones((3, 2), np.float32)}})
    progress_ = types.SimpleNamespace(pending=pending)
    with pytest.raises(progress.TrainingDivergedError, match="became inf at step 10;"):
        progress.Progress.check_savable(progress_, fine, step=10)
    progress_.pending = pending[:1]
    progress.Progress.check_savable(progress_, fine, step=10)  # All finite: no error.
    poisoned = types.SimpleNamespace(params={"Dense_0": {"kernel": np.full((3, 2), np.nan,
                                                                          np.float32)}})
    with pytest.raises(progress.TrainingDivergedError,
                       match="parameters became NaN or Inf at step 4"):
        progress.Progress.check_savable(progress_, poisoned, step=4)


# ---------------------------------------------------------------------------------------------
# A full disk while saving.

# main, with the disk filling up after the first checkpoint: orbax's next save fails on a write
# into its temporary directory (orbax writes the small JSON/metadata files in Python; the arrays
# go through tensorstore, which reports a real ENOSPC as a ValueError, handled the same way).
_MAIN_WITH_FULL_DISK = textwrap.dedent("""
    import errno, sys
    from absl import app
    from etils import epath
    from mnist_flax import checkpoints, main
    from mnist_flax.run import boundary

    real_save, real_write_text = checkpoints.save, epath.gpath._GPath.write_text
    full = []

    def save(manager, *args):
        saved = real_save(manager, *args)
        checkpoints.finish(manager)  # Committed (saves are asynchronous) ...
        full.append(True)  # ... and the disk is full from now on.
        return saved

    def write_text(self, *args, **kwargs):
        if full and "orbax-checkpoint-tmp" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    checkpoints.save, epath.gpath._GPath.write_text = save, write_text
    main.define_flags()
    app.run(main.main, flags_parser=boundary.parse_flags)
""")


@pytest.fixture(scope="module")
def disk_full_run(base):
    """main with the disk full after its first checkpoint; the result and that checkpoint."""
    workdir = base / "disk_full"
    result = run_main(*tiny_flags(base / "data", workdir), script=_MAIN_WITH_FULL_DISK)
    return result, saved_state(workdir, 3) if checkpoints.latest_step(str(workdir)) else None


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_the_run_resumes(
        base, reference, disk_full_run):
    workdir = base / "disk_full"
    result, _ = disk_full_run
    last = one_line_error(result)
    assert ("saving the checkpoint at step 6 failed (no space left on device); the checkpoint at "
            "step 3 is intact; free space and run the same command to resume") in last
    assert checkpoints.latest_step(str(workdir)) == 3

    # Space is back: the same run resumes from step 3 and ends exactly where an uninterrupted
    # one does, so the checkpoint it resumed from was intact.
    state, metrics = train.train_and_evaluate(small_config(base / "data"), str(workdir))
    expected, expected_metrics = reference
    assert_trees_identical(host_tree(state), expected)
    assert metrics["test/accuracy"] == expected_metrics["test/accuracy"]


def _private_tmpfs_works(directory) -> bool:
    """Whether a test may mount a tmpfs of its own (root, or user namespaces), as test_pod does."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            'mount -t tmpfs -o size=64k probe "$0"', str(directory)],
                           capture_output=True)
    return probe.returncode == 0


# The run on a small tmpfs mounted in a private mount namespace (nobody else sees it), then a copy
# of its workdir out to the real disk before the namespace, and the tmpfs with it, goes away.
_ON_A_SMALL_DISK = ('mount -t tmpfs -o size=600k full "$DISK" || exit 99; "$@"; code=$?; '
                    'cp -a "$DISK/run" "$COPY"; exit $code')


def test_a_real_full_disk_is_one_line_and_the_copied_workdir_resumes(base, tmp_path):
    """A full file system, not a simulated write error: 600 KiB hold the tiny model's first
    checkpoints (a checkpoint every step, none pruned) and not a later one. The run's one line is
    all it says of it: none of the tracebacks and E-lines of orbax's and TensorBoard's threads
    that each reported the same ENOSPC. Its workdir, copied out, resumes from the checkpoint the
    line calls intact."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    if not _private_tmpfs_works(disk):
        pytest.skip("needs `unshare -m` and mount (root or user namespaces) for a private tmpfs")
    flags = tiny_flags(base / "data", disk / "run", checkpoint_every_steps=1,
                       checkpoint_keep=NUM_STEPS)
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c", _ON_A_SMALL_DISK, "sh",
               sys.executable, "-m", "mnist_flax.main", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MNIST_DATA_DIR": "", "DISK": str(disk),
           "COPY": str(copy)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env)
    tail = result.stderr[-3000:]
    assert result.returncode == 1, tail
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, tail
    saved = re.search(r"saving the checkpoint at step (\d+) failed \(no space left on device\); "
                      r"the checkpoint at step (\d+) is intact; free space and run the same "
                      r"command to resume$", errors[0])
    assert saved and 0 < int(saved[2]) < int(saved[1]) < NUM_STEPS, tail
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, tail
    assert not re.search(r"^E\d{4} ", result.stderr, re.MULTILINE), tail  # absl's ERROR lines.
    intact = int(saved[2])
    assert checkpoints.latest_step(str(copy)) == intact

    # Space is back (the same files on a disk with room): the same command resumes from there.
    resumed = run_main(*tiny_flags(base / "data", copy, checkpoint_every_steps=1,
                                         checkpoint_keep=NUM_STEPS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint at step {intact} " in resumed.stderr
    assert checkpoints.latest_step(str(copy)) == NUM_STEPS


def test_a_failed_save_of_any_kind_is_one_line(tmp_path, monkeypatch):
    class Manager:  # What checkpoints.save needs of a manager whose write fails.
        directory = tmp_path
        in_flight = None  # The step whose asynchronous write is under way.

        def latest_step(self):
            return self.in_flight

        def wait_until_finished(self):
            if self.in_flight is not None:  # Its background write failed; orbax unlists it.
                self.in_flight = None
                raise RuntimeError("DEADLINE_EXCEEDED: the bucket stopped answering")

        def save(self, step, **kwargs):
            if step == 4:
                raise ValueError('RESOURCE_EXHAUSTED: Error writing "x/0": Failed to write '
                                 "111167 bytes to file 11: No space left on device "
                                 "[os_error_code='28']")
            self.in_flight = step
            return True

    monkeypatch.setattr(checkpoints, "state_tree", lambda state: state)
    with pytest.raises(checkpoints.CheckpointError) as error:  # In the blocking part.
        checkpoints.save(Manager(), {}, {"step": 4})
    assert str(error.value) == (f"{tmp_path}: saving the checkpoint at step 4 failed (no space "
                                "left on device); no checkpoint yet; free space and run the "
                                "same command to resume")

    manager = Manager()  # In the background: reported by the next save, naming its step.
    assert checkpoints.save(manager, {}, {"step": 5})
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.save(manager, {}, {"step": 6})
    assert str(error.value) == (f"{tmp_path}: saving the checkpoint at step 5 failed "
                                "(RuntimeError: DEADLINE_EXCEEDED: the bucket stopped answering); "
                                "no checkpoint yet; fix that (is the storage reachable?) and run "
                                "the same command to resume")


# ---------------------------------------------------------------------------------------------
# One run per workdir.


def test_a_second_lock_on_a_workdir_is_refused_until_the_first_is_released(tmp_path):
    with lock_lib.lock(str(tmp_path)):
        with pytest.raises(workdir_lib.WorkdirError) as error:
            with lock_lib.lock(str(tmp_path)):
                pass
        assert str(error.value) == (f"another run (pid {os.getpid()}) is using --workdir="
                                    f"{tmp_path}; wait for it or use another workdir")
    with lock_lib.lock(str(tmp_path)):  # Released: free again.
        pass


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mnist_flax.run import lock
    with lock.lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_a_run_on_a_busy_workdir_stops_and_a_killed_run_frees_it(base, reference):
    workdir = base / "reference"  # A finished run's workdir, now held by another process.
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(workdir)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(workdir)
        result = run_main(*tiny_flags(base / "data", workdir))
        assert one_line_error(result) == (
            f"error: another run (pid {holder.pid}) is using --workdir={workdir}; wait for it or "
            "use another workdir")
        assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    with lock_lib.lock(str(workdir)):  # The kernel dropped the dead run's lock.
        pass


# ---------------------------------------------------------------------------------------------
# A TFDS data dir that is empty or corrupt.


def _write_tfds_mnist(root, shard: bytes | None, info: str | None = None) -> None:
    """A prepared-looking TFDS mnist 3.0.1 (real metadata) whose shards hold `shard`."""
    import tensorflow_datasets as tfds

    directory = os.path.join(root, "mnist", "3.0.1")
    os.makedirs(directory)
    builder = tfds.builder("mnist", data_dir=str(root), file_format="array_record")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=n * 800,
                            filename_template=tfds.core.ShardedFileTemplate(
                                data_dir=directory, dataset_name="mnist", split=split,
                                filetype_suffix="array_record",
                                template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"))
        for split, n in (("train", 40), ("test", 20))]))
    builder.info.set_file_format("array_record")
    builder.info.write_to_directory(directory)
    for split in ("train", "test"):
        if shard is not None:
            with open(os.path.join(directory, f"mnist-{split}.array_record-00000-of-00001"),
                      "wb") as f:
                f.write(shard)
    if info is not None:
        with open(os.path.join(directory, "dataset_info.json"), "w") as f:
            f.write(info)


@pytest.mark.parametrize("layout, message", [
    ({}, "no prepared TFDS mnist found in"),
    ({"shard": b"\x00garbage" * 100}, "TFDS mnist train split is unreadable"),
    ({"shard": b""}, "TFDS mnist train split is unreadable"),
    ({"shard": None}, "TFDS mnist train split is unreadable"),  # Shards missing.
    ({"shard": b"", "info": "not json {"}, "the TFDS mnist copy there is corrupt (ParseError"),
    ({"shard": b"", "info": "[1, 2]"}, "the TFDS mnist copy there is corrupt"),
])
def test_an_empty_or_corrupt_tfds_dir_is_a_one_line_error(tmp_path, monkeypatch, layout, message):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(mnist_tfds, "mnist_url", lambda: "http://127.0.0.1:9/")  # Offline.
    root = tmp_path / "tfds"
    root.mkdir()
    if layout:
        _write_tfds_mnist(root, **layout)
    config = load_config()
    config.update(data_source="tfds", tfds_data_dir=str(root))
    with pytest.raises(DataError) as error:
        input_pipeline.load_dataset(config)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(str(root) if layout else f"--config.data_source=tfds: "
                                       f"no prepared TFDS mnist found in {root} ")


# ---------------------------------------------------------------------------------------------
# Config files that load but cannot work.


def test_a_config_file_without_get_config_is_one_line(tmp_path):
    path = tmp_path / "bad_config.py"
    path.write_text("def config():\n    return {}\n")  # A typo'd name: no get_config.
    result = run_main(f"--workdir={tmp_path / 'run'}", f"--config={path}")
    last = one_line_error(result)
    assert "cannot load the config file" in last and "defines get_config()" in last
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# A finished run started again, and signals after its last step.


def picture_steps(workdir) -> dict[str, list[int]]:
    return event_reader.read_image_steps(str(workdir / "test"))


@pytest.fixture(scope="module")
def finished(base):
    """A finished workdir and its final metrics."""
    _, metrics = conftest.train_as_main(small_config(base / "data"), base / "finished")
    return base / "finished", metrics


@pytest.mark.parametrize("other_data", ["other digits, same sizes", "the same digits reordered"])
def test_a_resume_on_other_data_is_refused_untouched_unless_the_config_says_so(base, finished,
                                                                              other_data):
    """The checkpoint knows its data (a fingerprint): MNIST_DATA_DIR or data_dir pointed at
    another data set of the same size trained on it without a word."""
    workdir, _ = finished
    other = base / f"other-data-{other_data.split()[-1]}"
    if other_data.startswith("other"):
        write_idx_dir(other, n_train=NUM_TRAIN, n_test=NUM_TEST, seed=5)
    else:
        images, labels = conftest.synthetic_digits(NUM_TRAIN)
        conftest.write_idx_files(other, (images[::-1], labels[::-1]),
                                 conftest.synthetic_digits(NUM_TEST, 1), True)
    before = conftest.snapshot_but_lock(workdir)
    with pytest.raises(checkpoints.CheckpointError, match=r"was trained on other data \(finger"):
        conftest.train_as_main(small_config(other, num_epochs=3), workdir)
    assert conftest.snapshot_but_lock(workdir) == before
    resumed = base / f"resumed-{other_data.split()[-1]}"
    shutil.copytree(workdir, resumed)
    state, _ = conftest.train_as_main(small_config(other, num_epochs=3, resume_on_other_data=True),
                                      resumed)
    assert int(state.step) == NUM_STEPS // 2 * 3


def test_a_finished_run_started_with_a_config_that_trains_otherwise_is_refused_untouched(
        base, finished):
    """It would train nothing and report its old results as the new config's (config.json and
    the HParams row rewritten to say so). Where the data comes from, or how often it logs, does
    not change its results: that restart goes on."""
    workdir, metrics = finished
    before = conftest.snapshot_but_lock(workdir)
    with pytest.raises(configs.ConfigError) as refused:
        conftest.train_as_main(
            small_config(base / "data", learning_rate=0.01, dropout_rates=(0.0, 0.0)), workdir)
    assert str(refused.value) == (
        f"--workdir={workdir} has finished training with another config (dropout_rates: "
        "[0.25, 0.5] -> [0.0, 0.0]; learning_rate: 0.001 -> 0.01); it would train nothing and "
        "report its results as this config's: use another --workdir, its values (those before "
        f"each '->' above; all are in {workdir}/config.json), or a larger --config.num_epochs to "
        "train on")
    assert conftest.snapshot_but_lock(workdir) == before  # Nothing written: config, events.

    _, again = conftest.train_as_main(small_config(base / "data", log_every_steps=1), workdir)
    assert again["test/accuracy"] == metrics["test/accuracy"]


class _SigtermBeforeTheLastStep(operations.Operations):
    """main's operations, with SIGTERM sent to this process once the loop has asked whether to
    stop for the last time (before the last dispatch; log_every_steps=1: a step a dispatch)."""

    def should_stop(self, step):
        stopping = super().should_stop(step)
        if step == NUM_STEPS - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return stopping


@pytest.mark.parametrize("at", ["last step", "pictures"])
def test_sigterm_after_the_last_step_lets_the_run_finish_with_its_pictures(base, at, caplog,
                                                                         monkeypatch):
    """Nothing is left to stop: the run ends as finished (results, pictures, exit 0), not as
    preempted at a wrong step (it said 'saved the checkpoint at step 0', exit 143)."""
    if at == "last step":
        monkeypatch.setattr(operations, "Operations", _SigtermBeforeTheLastStep)
    else:
        real_write = pictures.write_pictures

        def write_after_sigterm(*args):
            os.kill(os.getpid(), signal.SIGTERM)
            real_write(*args)

        monkeypatch.setattr(pictures, "write_pictures", write_after_sigterm)
    config = small_config(base / "data", log_every_steps=1)
    workdir = base / f"sigterm-{at.replace(' ', '-')}"
    state, metrics = conftest.train_as_main(config, workdir)
    assert int(state.step) == NUM_STEPS and "test/accuracy" in metrics
    assert "SIGTERM came after the last step: the run has finished" in caplog.text
    assert picture_steps(workdir) == dict.fromkeys(pictures.IMAGE_TAGS, [NUM_STEPS])


def test_a_finished_run_without_its_pictures_draws_them_when_started_again(base, monkeypatch):
    """A kill between the last save and the pictures leaves a finished run without them; the
    same command draws them (only then: a finished run started again adds no second copy)."""
    config = small_config(base / "data")
    workdir = base / "no-pictures"
    with monkeypatch.context() as patched:
        patched.setattr(pictures, "write_pictures", lambda *args: None)  # As if killed then.
        conftest.train_as_main(config, workdir)
    assert picture_steps(workdir) == {}
    conftest.train_as_main(config, workdir)
    assert picture_steps(workdir) == dict.fromkeys(pictures.IMAGE_TAGS, [NUM_STEPS])
    conftest.train_as_main(config, workdir)
    assert picture_steps(workdir) == dict.fromkeys(pictures.IMAGE_TAGS, [NUM_STEPS])


def test_an_eval_batch_larger_than_the_test_set_costs_no_more_memory_than_the_set(base, tmp_path):
    """It was padded whole: --config.eval_batch_size=100000000 asked for 73 GiB after training
    the whole epoch, and lost it."""
    config = small_config(base / "data", eval_batch_size=100_000_000, num_epochs=1)
    _, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    _, expected = train.train_and_evaluate(small_config(base / "data", num_epochs=1),
                                           str(tmp_path / "reference"))
    assert metrics["test/accuracy"] == expected["test/accuracy"]
