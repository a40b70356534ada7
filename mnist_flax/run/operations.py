"""The operations main wraps around the training core (`with held(...) as hooks:
train.train_and_evaluate(config, workdir, hooks, dataset)`): the workdir's lock or lease and the
stop signals for the block, `Preempted` after it if a signal stopped it; hooks that restore the
newest intact checkpoint, refuse a finished run changed, and save nothing after a lost lease.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import jax
import ml_collections
from absl import logging

from mnist_flax import configs, hooks
from mnist_flax.run import integrity, lock, signals, workdir

# Fields that change how a run goes, not what it computes (where it finds its data, how often
# it logs or saves, how it evaluates): a finished run started again with other values of these
# still reports its own results. Any other change to a finished run is refused.
RESULT_NEUTRAL_FIELDS = frozenset({
    "checkpoint_every_steps", "checkpoint_keep", "compilation_cache_dir", "data_dir",
    "eval_batch_size", "fast_ops", "log_every_steps", "profile_steps", "steps_per_dispatch",
    "resume_on_other_data", "tfds_data_dir", "verify_checksums"})


class Operations(hooks.Hooks):
    """main's `train.Hooks`, for a workdir `held` holds."""

    def __init__(self, config: ml_collections.ConfigDict, stop: signals.StopFlag,
                 held_lock: lock.Held):
        self.config, self.stop, self.held = config, stop, held_lock
        self.stopped_at: int | None = None  # The step should_stop stopped after.

    def restore(self, workdir_path: str, state, position: dict[str, int]):
        """The newest intact checkpoint (read under the lock: nothing else writes it now); the
        damaged ones skipped are moved aside, or orbax would count them among the newest kept."""
        state, damaged = integrity.restore_intact(workdir_path, state, position)
        if jax.process_index() == 0:
            for step, reason in damaged:
                integrity.move_aside(workdir_path, step, reason)
        if int(state.step):
            try:
                changes = workdir.config_changes(workdir_path, self.config)
            except workdir.WorkdirError as e:  # Damaged: only this log line needs it.
                changes = [f"unknown ({e}); it is rewritten now"]
            else:
                if int(state.step) >= position["steps_per_epoch"] * self.config.num_epochs:
                    refuse_a_finished_run_changed(workdir_path, changes)
            for change in changes:
                logging.warning("Config changed since the last start: %s", change)
        return state

    def should_stop(self, step: int) -> bool:
        if self.stop.agreed():
            self.stopped_at = step
        return self.stopped_at is not None

    def before_save(self, step: int) -> None:
        self.held.check()  # A run that lost its gs:// lease must not save over another's.


@contextlib.contextmanager
def held(workdir_path: str, config: ml_collections.ConfigDict,
         lease_seconds: float = workdir.LEASE_TTL_S) -> Iterator[Operations]:
    """The workdir and the stop signals, held for the block; raises `Preempted` after a block
    that a signal stopped early (a signal after the last step only says the run has finished)."""
    with signals.StopFlag() as stop, lock.lock(workdir_path, lease_seconds) as held_lock:
        operations = Operations(config, stop, held_lock)
        yield operations
    if operations.stopped_at is not None:
        preempted = signals.Preempted(operations.stopped_at, stop.signum)
        logging.warning("%s", preempted)
        raise preempted
    if stop.signum is not None:
        name = "Ctrl-C" if stop.signum == signal.SIGINT else signal.Signals(stop.signum).name
        logging.warning("%s came after the last step: the run has finished", name)


def refuse_a_finished_run_changed(workdir_path: str, changes: list[str]) -> None:
    """A finished run trains nothing: started with a config that would have trained otherwise, it
    would report its old results as this config's (and config.json would say so), so it is
    refused before anything is written. `changes` are `workdir.config_changes`' lines."""
    decisive = [c for c in changes if c.split(":", 1)[0] not in RESULT_NEUTRAL_FIELDS]
    if decisive:
        raise configs.ConfigError(
            f"--workdir={workdir_path} has finished training with another config "
            f"({'; '.join(decisive)}); it would train nothing and report its results as this "
            f"config's: use another --workdir, its values (those before each '->' above; all are "
            f"in {workdir.config_path(workdir_path)}), or a larger --config.num_epochs to train on")
