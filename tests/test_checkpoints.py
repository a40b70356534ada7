"""Checkpoints: round trip, keep-last-K, mismatch errors, SIGTERM and Ctrl-C, atomic saves, exact
resume. (Damaged checkpoints: test_damage.py.)

The resume tests run `python -m mnist_flax.main` in a subprocess on 320 synthetic digits, stop it
(SIGKILL; SIGTERM as a preemption does; SIGINT as Ctrl-C in a terminal does) at whatever step it
has reached after its first checkpoints, run the same command again, and require the final state
to equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, assert_trees_identical, snapshot, tiny_config, write_idx_dir

from mnist_flax import checkpoints, train
from mnist_flax.run import signals

ROOT = str(REPO)


def small_config(**overrides) -> ml_collections.ConfigDict:
    return tiny_config(**{"batch_size": 16, "num_epochs": 2, "log_every_steps": 1,
                          "eval_batch_size": 64, **overrides})


@pytest.fixture(scope="module")
def tiny():
    """One small state for the unit tests (building one compiles `init`: seconds)."""
    config = small_config()
    return config, train.create_train_state(config, jax.random.key(0), steps_per_epoch=20)


def position(config, step: int, num_train: int = 320) -> dict[str, int]:
    return checkpoints.data_position(step, num_train // config.batch_size, config, num_train)


# ---------------------------------------------------------------------------------------------
# Unit tests, in process.


def test_save_then_restore_is_bit_identical(tmp_path, tiny):
    config, fresh = tiny
    # A state unlike the fresh one in every part, as after some training.
    state = fresh.replace(params=jax.tree.map(lambda p: p + 0.5, fresh.params),
                          opt_state=jax.tree.map(lambda x: x + 1, fresh.opt_state),
                          step=jnp.asarray(7), dropout_key=jax.random.key(42))
    with contextlib.closing(checkpoints.create_manager(str(tmp_path), keep=3)) as manager:
        assert checkpoints.save(manager, state, position(config, 7))
        assert not checkpoints.save(manager, state, position(config, 7))  # Once per step.
    restored = checkpoints.restore(str(tmp_path), fresh, position(config, 0))
    assert int(restored.step) == 7
    assert_trees_identical(checkpoints.state_tree(restored), checkpoints.state_tree(state))
    assert np.array_equal(jax.random.key_data(restored.dropout_key),
                          jax.random.key_data(state.dropout_key))
    # The restored optimizer state has optax's own types again, so the step function takes it.
    assert type(restored.opt_state[0]) is type(state.opt_state[0])


def test_restore_without_checkpoint_returns_the_fresh_state(tmp_path, tiny):
    config, state = tiny
    assert checkpoints.restore(str(tmp_path), state, position(config, 0)) is state
    assert not os.path.exists(tmp_path / "checkpoints")  # Reading never creates anything.


def test_keeps_the_newest_k(tmp_path, tiny):
    config, state = tiny
    with contextlib.closing(checkpoints.create_manager(str(tmp_path), keep=2)) as manager:
        for step in range(1, 6):
            checkpoints.save(manager, state.replace(step=step), position(config, step))
        assert manager.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]


def test_other_model_width_is_a_clear_error_and_the_workdir_is_untouched(tmp_path, tiny):
    _, saved = tiny
    config = small_config(data_source="sample", num_epochs=1)
    with contextlib.closing(checkpoints.create_manager(str(tmp_path), keep=3)) as manager:
        checkpoints.save(manager, saved.replace(step=5),
                         checkpoints.data_position(5, 250, config, 4000))
    checkpoints.write_config(str(tmp_path), config)
    before = snapshot(tmp_path)

    wider = small_config(data_source="sample", num_epochs=1, conv_features=(8, 32))
    with pytest.raises(checkpoints.CheckpointError) as error:
        train.train_and_evaluate(wider, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "params/Conv_1/bias has shape (16,) in the checkpoint but (32,) in the config" in message
    assert snapshot(tmp_path) == before


def test_check_shapes_names_missing_and_extra_parameters():
    with pytest.raises(checkpoints.CheckpointError, match="has no params/Dense_2/kernel"):
        checkpoints.check_shapes({"params/a": (1,)}, {"params/a": (1,), "params/Dense_2/kernel":
                                                      (2, 2)}, "w")
    with pytest.raises(checkpoints.CheckpointError, match="has params/b .*does not"):
        checkpoints.check_shapes({"params/a": (1,), "params/b": (3,)}, {"params/a": (1,)}, "w")
    checkpoints.check_shapes({"params/a": (1,)}, {"params/a": (1,)}, "w")  # Equal: no error.


def test_a_checkpoint_of_another_prng_implementation_names_it_not_the_config(tmp_path, tiny):
    """JAX_DEFAULT_PRNG_IMPL=rbg on a resume was blamed on the config ('use ... the config it
    was trained with'), which had not changed: the dropout key's shape is the PRNG's."""
    config, state = tiny
    with contextlib.closing(checkpoints.create_manager(str(tmp_path), keep=3)) as manager:
        checkpoints.save(manager, state.replace(step=3), position(config, 3))
    rbg = train.create_train_state(config, jax.random.key(0, impl="rbg"), steps_per_epoch=20)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.restore(str(tmp_path), rbg, position(config, 0))
    assert "dropout key has shape (2,), this process's (4,): another PRNG implementation" in str(
        error.value) and "JAX_DEFAULT_PRNG_IMPL" in str(error.value)
    assert "config" not in str(error.value)


def test_other_batch_size_is_an_error_because_it_changes_the_data_order(tmp_path, tiny):
    config, state = tiny
    with contextlib.closing(checkpoints.create_manager(str(tmp_path), keep=3)) as manager:
        checkpoints.save(manager, state.replace(step=3), position(config, 3))
    other = small_config(batch_size=32)
    with pytest.raises(checkpoints.CheckpointError, match="batch_size=16 but this run has 32"):
        checkpoints.restore(str(tmp_path), state, position(other, 0))


def _wait_for(flag) -> None:
    for _ in range(100):  # The handler runs at the next bytecode boundary.
        if flag.is_set():
            break
        time.sleep(0.01)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT as in a terminal, even where pytest runs as a background job (SIGINT ignored, which
    StopFlag rightly leaves ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def hangup_kills():
    """SIGHUP as in a terminal, even where pytest runs under nohup (SIGHUP ignored, which StopFlag
    rightly leaves ignored, and which a run started from here would inherit)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_sets_the_flag_and_the_old_handlers_come_back(signum, ctrl_c_raises,
                                                                    hangup_kills):
    previous = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    with signals.StopFlag() as flag:
        assert not flag.is_set()
        os.kill(os.getpid(), signum)
        _wait_for(flag)
        assert flag.is_set() and flag.signum == signum
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == previous


def test_a_second_ctrl_c_raises_keyboard_interrupt_at_once(ctrl_c_raises):
    with signals.StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(flag)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # Interrupted long before this ends.
    assert flag.signum == signal.SIGINT


# ---------------------------------------------------------------------------------------------
# Atomic saves: SIGKILL while orbax is writing, then read the newest checkpoint.

_SAVE_FOREVER = textwrap.dedent("""
    import sys, numpy as np, orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False,
                                           preservation_policy=ocp.checkpoint_managers.LatestN(2))
    manager = ocp.CheckpointManager(sys.argv[1], options=options)
    for step in range(1, 10_000):
        tree = {"x": np.full((16, 1024, 1024), step, np.float32)}  # 64 MB: a save takes a while.
        manager.save(step, args=ocp.args.StandardSave(tree), force=True)
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    directory = tmp_path / "checkpoints"
    process = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # Wait until a save is under way after a finished one.
            names = os.listdir(directory) if directory.exists() else []
            if any("tmp" in n for n in names) and any(n.isdigit() for n in names):
                break
            time.sleep(0.002)
        else:
            pytest.fail("no save in progress within 60 s")
        process.kill()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert any("tmp" in n for n in os.listdir(directory))  # Killed mid-save.

    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True))
    step = manager.latest_step()
    assert step is not None
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    assert np.all(np.asarray(restored["x"]) == step)  # Complete, and the one its name says.


# ---------------------------------------------------------------------------------------------
# Exact resume of `python -m mnist_flax.main`, killed in a subprocess.

NUM_TRAIN, NUM_TEST = 320, 64
NUM_STEPS = NUM_TRAIN // 16 * 2  # batch 16, 2 epochs.


def main_command(data_dir, workdir) -> list[str]:
    return [sys.executable, "-m", "mnist_flax.main", f"--workdir={workdir}",
            "--config.data_source=idx", f"--config.data_dir={data_dir}",
            # (2,)/4: a width where XLA:CPU rounds 4 scanned steps as 4 single ones (docs/speed.md,
            # "dispatch_rounding"), so the k=4 run resumes bit-identical to the k=1 one.
            "--config.verify_checksums=False", "--config.conv_features=(2,)",
            "--config.dense_features=4", "--config.batch_size=16", "--config.num_epochs=2",
            "--config.eval_batch_size=64", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=3"]


def run_env() -> dict[str, str]:
    """CPU, and the session's compilation cache (conftest): later runs load `train_step` instead
    of compiling it again (the same executable an uninterrupted run would use)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_to_end(command, log_path) -> str:
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=300,
                                env=run_env(), cwd=ROOT)
    output = open(log_path).read()
    assert result.returncode == 0, output[-3000:]
    return output


@contextlib.contextmanager
def _sigint_as_in_a_terminal() -> Iterator[None]:
    """While starting a child: a shell starts background jobs (and so maybe this test) with
    SIGINT ignored, and a child inherits that; a handled one is the default after exec, as in a
    terminal's foreground job. (Not preexec_fn: a fork of a process running JAX's threads.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_and_interrupt(command, log_path, sig: int, after_step: int,
                      again_after: float | None = None) -> tuple[int, str]:
    """Starts `command`, sends `sig` once its log reports `after_step` steps (and again
    `again_after` seconds later, if given); returns rc, log."""
    with open(log_path, "w") as log:
        with _sigint_as_in_a_terminal():
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env=run_env(), cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                steps = [int(s) for s in re.findall(rf"step (\d+)/{NUM_STEPS}:",
                                                    open(log_path).read())]
                if steps and max(steps) >= after_step:
                    process.send_signal(sig)
                    if again_after is not None:
                        time.sleep(again_after)
                        process.send_signal(sig)
                    break
                time.sleep(0.005)
            process.wait(timeout=120)
        finally:
            process.kill()
    return process.returncode, open(log_path).read()


def final_state(workdir) -> dict:
    manager = checkpoints.create_manager(str(workdir), keep=1, read_only=True)
    assert manager.latest_step() == NUM_STEPS
    restored = manager.restore(NUM_STEPS, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"])


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    write_idx_dir(base / "data", n_train=NUM_TRAIN, n_test=NUM_TEST)
    run_to_end(main_command(base / "data", base / "uninterrupted"), base / "uninterrupted.log")
    return base, final_state(base / "uninterrupted")


def resume_to_the_end(command, workdir, expected) -> int:
    """Reruns a stopped run to its end; checks it ends bit-identical to the uninterrupted run,
    skipping no damaged checkpoint, and returns the step it resumed from."""
    log = run_to_end(command, workdir.parent / f"{workdir.name}_resumed.log")
    assert "damaged" not in log, log[-3000:]
    resumed_from = int(re.search(r"Resuming from the checkpoint at step (\d+) ", log).group(1))
    assert_trees_identical(final_state(workdir), expected)
    return resumed_from


def test_sigkill_at_any_step_then_resume_is_bit_identical(resume_setup):
    base, expected = resume_setup
    command = main_command(base / "data", base / "killed")
    rc, log = run_and_interrupt(command, base / "killed.log", signal.SIGKILL, after_step=8)
    assert rc == -signal.SIGKILL, log[-3000:]
    assert "Test accuracy" not in log  # It really was stopped mid-run.

    # Saves are asynchronous: the one at step 6 may still be in flight at step 8, but the one
    # before it is committed (a save starts only once the previous one is).
    assert 3 <= resume_to_the_end(command, base / "killed", expected) < NUM_STEPS


K4 = ("--config.steps_per_dispatch=4", "--config.log_every_steps=4")


@pytest.mark.parametrize("signum,code,extra", [(signal.SIGTERM, 143, K4),
                                               (signal.SIGHUP, 129, ())])
def test_sigterm_or_sighup_saves_exits_128_plus_it_then_resume_is_bit_identical(resume_setup,
                                                                                signum, code,
                                                                                extra,
                                                                                hangup_kills):
    """SIGTERM is a preemption; SIGHUP is what a run started over ssh gets when it drops. Both go
    through the one stop flag; SIGTERM's run takes 4 steps per dispatch, so its stop lands on a
    dispatch's end and the resumed k=4 run must still end bit-identical to the uninterrupted
    one-step-per-dispatch run (this case was its own test, a third pair of runs)."""
    base, expected = resume_setup
    workdir = base / signal.Signals(signum).name
    command = [*main_command(base / "data", workdir), *extra]
    rc, log = run_and_interrupt(command, base / f"{workdir.name}.log", signum, after_step=8)
    assert rc == 128 + signum == code, log[-3000:]
    stopped_at = int(re.search(rf"{signal.Signals(signum).name}[^:]*: saved the checkpoint at "
                               r"step (\d+)", log).group(1))
    assert 8 <= stopped_at < NUM_STEPS, log[-3000:]
    assert checkpoints.latest_step(str(workdir)) == stopped_at  # The last word.

    assert resume_to_the_end(command, workdir, expected) == stopped_at


def test_ctrl_c_finishes_the_step_saves_exits_130_then_resume_is_bit_identical(resume_setup):
    base, expected = resume_setup
    command = main_command(base / "data", base / "ctrl_c")
    rc, log = run_and_interrupt(command, base / "ctrl_c.log", signal.SIGINT, after_step=10)
    assert rc == signals.INTERRUPTED_EXIT_CODE == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    stopped_at = int(re.search(r"Interrupted \(Ctrl-C\) at step (\d+); checkpoint saved; "
                               r"exiting with status 130\. Run the same command to resume\.",
                               log).group(1))
    assert 10 <= stopped_at < NUM_STEPS
    assert checkpoints.latest_step(str(base / "ctrl_c")) == stopped_at  # The steps are kept.

    assert resume_to_the_end(command, base / "ctrl_c", expected) == stopped_at


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_stays_intact(resume_setup):
    """The second Ctrl-C comes 30 ms after the first: while the step finishes or the checkpoint
    is being written. Either way the run exits 130 with one line and no traceback, and the newest
    checkpoint it leaves restores intact (no damaged one is skipped) and resumes bit-identical."""
    base, expected = resume_setup
    command = main_command(base / "data", base / "ctrl_c_twice")
    rc, log = run_and_interrupt(command, base / "ctrl_c_twice.log", signal.SIGINT,
                                after_step=10, again_after=0.03)
    assert rc == 130, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("Interrupted (Ctrl-C): stopped at once without saving") or (
        "checkpoint saved; exiting with status 130" in last), log[-3000:]

    resume_to_the_end(command, base / "ctrl_c_twice", expected)
