"""Damaged workdirs: every kind of file in a checkpoint, config.json and the lock file, each cut
short, with bytes flipped, emptied, deleted or replaced by garbage, in a real finished run.

Each case damages the newest checkpoint (step 20) of a copy of one uninterrupted run's workdir and
runs the same training again. It either skips that checkpoint with one warning line, resumes from
step 18 and ends bit-identical to the uninterrupted run, or (where orbax never reads the file, or
the damage leaves what it reads intact, as the checksum proves) resumes from step 20 unwarned.
The damaged checkpoint is moved aside, never deleted.

Every run is the tiny model on 160 synthetic digits (batch 16: 10 steps an epoch, 2 epochs, a
checkpoint every 3 steps, the newest 3 kept: 15, 18, 20), in process, so they share one compile.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import (
    TINY_MODEL,
    assert_trees_identical,
    run_module,
    snapshot,
    snapshot_but_lock,
    tiny_config,
    train_as_main,
    write_idx_dir,
)

from mnist_flax import checkpoints, predict, train
from mnist_flax.run import integrity, operations
from mnist_flax.run import lock as lock_lib
from mnist_flax.run import workdir as workdir_lib

NUM_TRAIN, NUM_TEST, LAST = 160, 32, 20
TINY = {**TINY_MODEL, "batch_size": 16, "num_epochs": 2, "eval_batch_size": 32,
        "log_every_steps": 100, "checkpoint_every_steps": 3, "data_source": "idx",
        "verify_checksums": False}


def small_config(data_dir):
    return tiny_config(**{**TINY, "data_dir": str(data_dir)})


def host_tree(state) -> dict:
    return jax.tree.map(np.asarray, checkpoints.state_tree(state))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its data dir, its workdir (kept pristine) and its final state."""
    base = tmp_path_factory.mktemp("damage")
    write_idx_dir(base / "data", n_train=NUM_TRAIN, n_test=NUM_TEST)
    state, _ = train_as_main(small_config(base / "data"), str(base / "reference"))
    assert checkpoints.latest_step(str(base / "reference")) == LAST
    return base, host_tree(state)


# ---------------------------------------------------------------------------------------------
# The damage: what a bad disk, a bad copy or a stray editor does to a file.


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def flip(path):  # 4 bytes in the middle, inverted: the file still has its size.
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    for i in range(middle, min(middle + 4, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def empty(path):
    open(path, "wb").close()


def delete(path):
    os.remove(path)


def garbage(path):
    rng = np.random.default_rng(0)
    open(path, "wb").write(rng.integers(0, 256, max(os.path.getsize(path), 64), np.uint8)
                           .tobytes())


DAMAGES = {"truncated": truncate, "flipped": flip, "emptied": empty, "deleted": delete,
           "garbage": garbage}


def largest_array_file(step_dir):
    return max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


# Kind of file -> (where it is in a checkpoint's directory, how each damage ends): "skip" = the
# restore skips step 20 with one warning and resumes from 18; "use" = step 20 restores and its
# checksum matches (orbax never reads the file for a restore). Observed with orbax 0.12.
CHECKPOINT_FILES = {
    "array data (largest)": (largest_array_file, dict.fromkeys(DAMAGES, "skip")),
    "state/manifest.ocdbt": (lambda d: f"{d}/state/manifest.ocdbt", dict.fromkeys(DAMAGES, "skip")),
    "state/ocdbt.process_0/manifest.ocdbt": (lambda d: f"{d}/state/ocdbt.process_0/manifest.ocdbt",
                                             dict.fromkeys(DAMAGES, "use")),
    "state/_METADATA": (lambda d: f"{d}/state/_METADATA", dict.fromkeys(DAMAGES, "skip")),
    "state/_sharding": (lambda d: f"{d}/state/_sharding",
                        {**dict.fromkeys(DAMAGES, "skip"), "deleted": "use"}),
    "state/array_metadatas": (lambda d: f"{d}/state/array_metadatas/process_0",
                              {**dict.fromkeys(DAMAGES, "skip"), "deleted": "use"}),
    "_CHECKPOINT_METADATA": (lambda d: f"{d}/_CHECKPOINT_METADATA", dict.fromkeys(DAMAGES, "use")),
    "position JSON": (lambda d: f"{d}/position/metadata", dict.fromkeys(DAMAGES, "skip")),
    "commit marker": (lambda d: f"{d}/commit_success.txt", dict.fromkeys(DAMAGES, "use")),
}
CASES = [(kind, damage, outcome) for kind, (_, outcomes) in CHECKPOINT_FILES.items()
         for damage, outcome in outcomes.items()]


def copy_workdir(reference, name):
    base, _ = reference
    workdir = base / name
    shutil.copytree(base / "reference", workdir)
    return workdir


def damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "damaged checkpoint" in r.getMessage()]


@pytest.fixture(scope="module")
def fresh(reference):
    """A freshly initialised state for the config and the saved contents of steps 18 and 20."""
    base, _ = reference
    config = small_config(base / "data")
    state = train.create_train_state(config, jax.random.key(config.seed), NUM_TRAIN // 16)
    position = checkpoints.data_position(0, NUM_TRAIN // 16, config, NUM_TRAIN)
    older = copy_workdir(reference, "without-20")  # Step 18 is its newest.
    shutil.rmtree(older / "checkpoints" / str(LAST))
    saved = {step: host_tree(checkpoints.restore(str(workdir), state, position))
             for step, workdir in ((LAST, base / "reference"), (18, older))}
    return state, position, saved


@pytest.mark.parametrize("kind, damage, outcome", CASES)
def test_a_damaged_checkpoint_file_is_skipped_or_harmless(reference, fresh, caplog, kind,
                                                          damage, outcome):
    """Restores what was saved at step 18 (after one warning) or at 20, bit for bit; a resume
    from a bit-identical state ends bit-identical (test_checkpoints.py's resume tests)."""
    state, position, saved = fresh
    workdir = copy_workdir(reference, f"{kind}-{damage}".replace("/", "_").replace(" ", "_"))
    step_dir = workdir / "checkpoints" / str(LAST)
    DAMAGES[damage](CHECKPOINT_FILES[kind][0](step_dir))
    damaged_copy = snapshot(step_dir)

    with caplog.at_level(logging.WARNING):
        restored, skipped = integrity.restore_intact(str(workdir), state, position)
    warnings = damage_warnings(caplog)
    step = 18 if outcome == "skip" else LAST
    assert int(restored.step) == step, warnings
    assert_trees_identical(host_tree(restored), saved[step])
    if outcome == "use":
        assert not warnings and not skipped
        return
    assert len(warnings) == 1 and f"skipping the damaged checkpoint at step {LAST}: " in (
        warnings[0]), warnings
    assert "\n" not in warnings[0] and len(warnings[0]) < 400
    assert [s for s, _ in skipped] == [LAST]
    # The run's writing manager moves it aside as it was, so keep-N no longer counts it.
    config = small_config(reference[0] / "data")
    operations.Operations(config, None, None).restore(str(workdir), state, position)  # As main.
    with contextlib.closing(checkpoints.create_manager(str(workdir), 3)) as m:
        assert m.all_steps() == [15, 18]
    set_aside = glob.glob(f"{workdir}/checkpoints/damaged-{LAST}-*")
    assert len(set_aside) == 1 and snapshot(set_aside[0]) == damaged_copy


@pytest.mark.parametrize("kind, damage", [("array data (largest)", "flipped"),  # Checksum.
                                          ("commit marker", "deleted")])  # Not read.
def test_a_run_resumed_past_a_damaged_checkpoint_ends_bit_identical(reference, caplog, kind,
                                                                    damage):
    base, expected = reference
    workdir = copy_workdir(reference, f"run-{kind}-{damage}".replace(" ", "_"))
    DAMAGES[damage](CHECKPOINT_FILES[kind][0](workdir / "checkpoints" / str(LAST)))
    with caplog.at_level(logging.INFO):
        state, _ = train_as_main(small_config(base / "data"), str(workdir))
    assert_trees_identical(host_tree(state), expected)
    resumed = [r.getMessage() for r in caplog.records  # At the run's end: "has finished all".
               if "Resuming from" in r.getMessage() or "has finished all" in r.getMessage()]
    outcome = CHECKPOINT_FILES[kind][1][damage]
    assert f"at step {18 if outcome == 'skip' else LAST} " in resumed[0]
    assert checkpoints.latest_step(str(workdir)) == LAST  # Saved again when it was skipped.
    assert len(glob.glob(f"{workdir}/checkpoints/damaged-*")) == (outcome == "skip")


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_config_json_does_not_stop_a_resume(reference, fresh, caplog, damage):
    base, _ = reference
    state, position, saved = fresh
    workdir = copy_workdir(reference, f"config-{damage}")
    DAMAGES[damage](workdir / checkpoints.CONFIG_FILE)
    with caplog.at_level(logging.WARNING):
        restored = operations.Operations(small_config(base / "data"), None, None).restore(
            str(workdir), state, position)
    assert int(restored.step) == LAST and not glob.glob(f"{workdir}/checkpoints/damaged-*")
    assert not damage_warnings(caplog)
    # predict needs the config to build the model: one line, which names the file.
    with pytest.raises(predict.PredictError) as error:
        predict.load(str(workdir))
    assert str(error.value).startswith(str(workdir / checkpoints.CONFIG_FILE))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_lock_file_does_not_stop_a_run(reference, damage):
    workdir = copy_workdir(reference, f"lock-{damage}")
    DAMAGES[damage](workdir / workdir_lib.LOCK_FILE)
    with lock_lib.lock(str(workdir)):
        assert (workdir / workdir_lib.LOCK_FILE).read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("name", [checkpoints.CONFIG_FILE, workdir_lib.LOCK_FILE])
def test_a_run_with_a_garbage_config_or_lock_file_ends_bit_identical(reference, name):
    base, expected = reference
    workdir = copy_workdir(reference, f"run-{name}")
    garbage(workdir / name)
    state, _ = train_as_main(small_config(base / "data"), str(workdir))
    assert_trees_identical(host_tree(state), expected)
    assert workdir_lib.config_changes(str(workdir), small_config(base / "data")) == []  # Rewritten.


def test_contents_that_read_back_whole_but_are_not_what_was_saved_fail_the_checksum(
        reference, fresh, caplog):
    """Step 18's arrays under step 20's name: every file decodes, only the checksum can tell."""
    state, position, saved = fresh
    workdir = copy_workdir(reference, "swapped-contents")
    checkpoints_dir = workdir / "checkpoints"
    shutil.rmtree(checkpoints_dir / str(LAST) / "state")
    shutil.copytree(checkpoints_dir / "18" / "state", checkpoints_dir / str(LAST) / "state")
    with caplog.at_level(logging.WARNING):
        restored, skipped = integrity.restore_intact(str(workdir), state, position)
    assert int(restored.step) == 18
    assert_trees_identical(host_tree(restored), saved[18])
    assert [(s, r.split(":")[0]) for s, r in skipped] == [(LAST, "checksum mismatch")]
    assert len(damage_warnings(caplog)) == 1


def test_checkpoints_without_a_checksum_restore_with_a_warning(reference, caplog):
    """A checkpoint written before checksums existed (its position JSON has no sha256)."""
    base, expected = reference
    workdir = copy_workdir(reference, "no-checksum")
    position = workdir / "checkpoints" / str(LAST) / "position" / "metadata"

    data = json.loads(position.read_text())
    del data[checkpoints.CHECKSUM_KEY]
    position.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO):
        state, _ = train_as_main(small_config(base / "data"), str(workdir))
    assert_trees_identical(host_tree(state), expected)
    lines = [r.getMessage() for r in caplog.records if "has no checksum" in r.getMessage()]
    assert len(lines) == 1 and f"step {LAST} has no checksum" in lines[0]


# ---------------------------------------------------------------------------------------------
# The command lines: one line each, no traceback, nothing written when nothing is intact.


def damage_all(workdir, damage=truncate):
    for step_dir in glob.glob(f"{workdir}/checkpoints/[0-9]*"):
        damage(largest_array_file(step_dir))


def main_flags(base, workdir, *extra) -> list[str]:
    flags = [f"--config.{k}={'(' + ','.join(map(str, v)) + ')' if isinstance(v, tuple) else v}"
             for k, v in TINY.items()]
    return [f"--workdir={workdir}", f"--config.data_dir={base / 'data'}", *flags, *extra]


def test_cli_with_every_checkpoint_damaged_is_one_line_and_writes_nothing(reference):
    base, _ = reference
    workdir = copy_workdir(reference, "all-damaged-cli")
    damage_all(workdir)
    before = snapshot_but_lock(workdir)
    result = run_module("main", *main_flags(base, workdir, "--config.num_epochs=3"),
                        env={"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: {workdir}/checkpoints: no intact checkpoint (damaged: step 20, 18, "
                    f"15); move that directory aside to start afresh, or restore {workdir} from "
                    "a backup")
    assert snapshot_but_lock(workdir) == before

    result = run_module("predict", f"--workdir={workdir}", "img.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {workdir}/checkpoints: no intact checkpoint")
    assert snapshot_but_lock(workdir) == before


def test_cli_skips_a_damaged_newest_checkpoint_with_one_line_each(reference):
    """The issue's run: the newest checkpoint's largest file cut short, then more epochs."""
    base, _ = reference
    workdir = copy_workdir(reference, "newest-damaged-cli")
    truncate(largest_array_file(workdir / "checkpoints" / str(LAST)))
    result = run_module("main", *main_flags(base, workdir, "--config.num_epochs=3"),
                        env={"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Event loop" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if "skipping the damaged" in line]
    assert len(skipped) == 1 and "at step 20: unreadable (ValueError: OUT_OF_RANGE" in skipped[0]
    assert "Resuming from the checkpoint at step 18 " in result.stderr
    assert checkpoints.latest_step(str(workdir)) == 30
    assert len(glob.glob(f"{workdir}/checkpoints/damaged-20-*")) == 1


def test_predict_uses_the_newest_intact_checkpoint(reference, caplog):
    workdir = copy_workdir(reference, "predict-damaged")
    flip(largest_array_file(workdir / "checkpoints" / str(LAST)))
    before = snapshot(workdir)
    with caplog.at_level(logging.WARNING):
        model = predict.load(str(workdir))
    assert model.step == 18
    assert model(np.zeros((2, 28, 28), np.uint8)).shape == (2, 10)
    warnings = damage_warnings(caplog)
    # Which arrays share the largest OCDBT file, and where, varies with tensorstore's write
    # order: the flipped bytes fail zstd's decoding (unreadable) or decode to wrong values
    # (checksum mismatch). Either way one line names step 20 and why.
    assert len(warnings) == 1, warnings
    assert re.search(r"at step 20: (checksum mismatch|unreadable \(ValueError: )", warnings[0])
    assert snapshot(workdir) == before  # Serving reads only; the damaged one stays in place.
