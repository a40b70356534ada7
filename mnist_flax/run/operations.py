"""The operations main wraps around the training core, through `train.Hooks`.

    with Operations(config, lease_seconds) as hooks:
        train.train_and_evaluate(config, workdir, hooks)

They hold the workdir (a flock, or a lease on gs://; on a pod, a check that every host sees it),
stop on SIGTERM, SIGHUP or Ctrl-C after saving (every host of a pod after the same step), restore
only a checkpoint whose checksum holds (moving damaged ones aside), refuse to save a diverged state
or after a lost lease, and draw the end-of-run pictures. A run stopped early raises `Preempted`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mnist_flax import checkpoints, configs, event_reader, hooks, pictures, progress
from mnist_flax.run import integrity, lock, signals, workdir
from mnist_flax.run.process import CompileCacheLog

# Fields that change how a run goes, not what it computes (where it finds its data, how often
# it logs or saves, how it evaluates): a finished run started again with other values of these
# still reports its own results. Any other change to a finished run is refused.
RESULT_NEUTRAL_FIELDS = frozenset({
    "checkpoint_every_steps", "checkpoint_keep", "compilation_cache_dir", "data_dir",
    "debug_nan_at_step", "eval_batch_size", "fast_ops", "log_every_steps", "profile_steps",
    "steps_per_dispatch", "tfds_data_dir", "verify_checksums"})


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_savable(state, pending: list[dict[str, jax.Array]], step: int) -> None:
    """Refuses to checkpoint a diverged state, which would push the last good checkpoint out:
    the losses since the last progress line, and every parameter (a finite loss can still give
    NaN gradients), for a few ms a save."""
    losses = jax.device_get([m["loss"] for m in pending])  # Scalars, or (k,) per dispatch.
    progress.check_finite([float(loss) for chunk in losses for loss in np.ravel(chunk)], step)
    if not bool(all_finite(state.params)):
        raise progress.TrainingDivergedError(
            f"the parameters became NaN or Inf at step {step}; stopped without saving them (the "
            "last good checkpoint, if any, is kept); lower --config.learning_rate")


class Operations(hooks.Hooks):
    """main's `train.Hooks`; a context manager so that its signal handlers last as long as it."""

    def __init__(self, config: ml_collections.ConfigDict,
                 lease_seconds: float = workdir.LEASE_TTL_S):
        self.config, self.lease_seconds = config, lease_seconds
        self.stop = signals.StopFlag()
        self.held: lock.Held | None = None
        self.stopped_at = 0
        self.finished = False  # The last step was trained: a signal now has nothing to stop.
        self.restored_finished = False  # Started again after its last step.
        self.workdir_path = ""
        self._cache_log = CompileCacheLog()
        self._first_dispatch = True

    def __enter__(self) -> Operations:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop.__exit__(*exc_info)

    @contextlib.contextmanager
    def hold(self, workdir_path: str) -> Iterator[None]:
        # Every process must see the workdir process 0 writes (a pod's hosts share no disk).
        workdir.check_shared(workdir_path)
        self.workdir_path = workdir_path
        with lock.lock(workdir_path, self.lease_seconds) as self.held:
            yield
        if self.stop.signum is not None and self.finished:
            name = ("Ctrl-C" if self.stop.signum == signal.SIGINT
                    else signal.Signals(self.stop.signum).name)
            logging.warning("%s came after the last step: the run has finished", name)
        elif self.stop.signum is not None:  # Stopped early by should_stop, after saving.
            signals.log_preempted(self.stopped_at, self.stop.signum)
            raise signals.Preempted(self.stopped_at, self.stop.signum)

    def restore(self, workdir_path: str, state, position: dict[str, int]):
        """The newest intact checkpoint (read under the lock: nothing else writes it now); the
        damaged ones skipped are moved aside, or orbax would count them among the newest kept."""
        state, damaged = integrity.restore_intact(workdir_path, state, position)
        if jax.process_index() == 0:
            for step, reason in damaged:
                integrity.move_aside(workdir_path, step, reason)
        self.restored_finished = (
            int(state.step) >= position["steps_per_epoch"] * self.config.num_epochs)
        if int(state.step):
            try:
                changes = workdir.config_changes(workdir_path, self.config)
            except workdir.WorkdirError as e:  # Damaged: only this log line needs it.
                changes = [f"unknown ({e}); it is rewritten now"]
            else:
                if self.restored_finished:
                    refuse_a_finished_run_changed(workdir_path, changes)
            for change in changes:
                logging.warning("Config changed since the last start: %s", change)
        return state

    def before_dispatch(self, state, step: int, num_steps: int):
        if self._first_dispatch:
            self._cache_log.start()
        nan_at = self.config.debug_nan_at_step  # Tests only: this step's loss becomes NaN.
        if nan_at - 1 > step:
            num_steps = min(num_steps, nan_at - 1 - step)
        elif step + 1 == nan_at:
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return state, num_steps

    def should_stop(self, step: int) -> bool:
        if self._first_dispatch:
            self._cache_log.report()
            self._first_dispatch = False
        stopping = self.stop.agreed()
        if stopping:
            self.stopped_at = step
        return stopping

    def before_save(self, state, position: dict[str, Any],
                    pending: list[dict[str, jax.Array]]) -> dict[str, Any]:
        check_savable(state, pending, position["step"])
        if self.held is not None:
            self.held.check()  # A run that lost its gs:// lease must not save over another's.
        tree = checkpoints.state_tree(state)
        return {**position, integrity.CHECKSUM_KEY: integrity.state_checksum(tree, position)}

    def after_training(self, state, dataset, writers) -> None:
        """The pictures; on a finished run started again, only if they are not there (a stop or
        a kill came between its last save and them)."""
        self.finished = True
        if not (self.restored_finished and writers is not None
                and pictures_written(self.workdir_path, int(state.step))):
            pictures.write_pictures(writers, state, dataset, self.config)


def pictures_written(workdir_path: str, step: int) -> bool:
    """Whether the workdir's test/ run holds every end-of-run picture at `step`."""
    steps = event_reader.read_image_steps(f"{workdir_path.rstrip('/')}/test")
    return all(step in steps.get(tag, []) for tag in pictures.IMAGE_TAGS)


def refuse_a_finished_run_changed(workdir_path: str, changes: list[str]) -> None:
    """A finished run trains nothing: started with a config that would have trained otherwise, it
    would report its old results as this config's (and config.json would say so), so it is
    refused before anything is written. `changes` are `workdir.config_changes`' lines."""
    decisive = [c for c in changes if c.split(":", 1)[0] not in RESULT_NEUTRAL_FIELDS]
    if decisive:
        raise configs.ConfigError(
            f"--workdir={workdir_path} has finished training with another config "
            f"({'; '.join(decisive)}); it would train nothing and report its results as this "
            f"config's: use another --workdir, the config it was trained with "
            f"({workdir.config_path(workdir_path)}), or a larger --config.num_epochs to train on")
