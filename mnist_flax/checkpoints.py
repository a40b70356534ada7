"""Checkpoints of the whole TrainState in `workdir/checkpoints/`, exact resume, and SIGTERM.

A run resumes exactly because the state holds everything the future depends on: params, optax
state, step and the dropout key (per-step keys are fold_in(dropout_key, step)); the epoch and the
position in the epoch's order follow from the step (`data_position`), and the order of every epoch
is `train.epoch_permutation(seed, epoch, n)`. So restoring the state and continuing the loop at
`state.step` replays the same batches and masks, bit for bit. Train metrics of a half-finished epoch
are not saved: a resumed epoch's train/* means cover only the steps after the resume.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact (tests/test_checkpoints.py checks it), and
a save that fails (a full disk) stops the run with one line naming the checkpoint that is intact.
`workdir_lock` keeps a second run off a workdir in use (tests/test_reliability.py).
Saves are synchronous: the state is 14 MB, a save takes well under a second, and the next
`train_step` donates (overwrites) the arrays a background save would still be reading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging as std_logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"  # Under the workdir.
CONFIG_FILE = "config.json"  # Under the workdir: the config the run was started (or resumed) with.
LOCK_FILE = ".lock"  # Under the workdir: flock-ed by the run using it; holds that run's pid.
# Exit status of a run stopped by SIGTERM after saving its checkpoint: 128 + SIGTERM, what a
# shell reports for a process SIGTERM ended, so job systems see "terminated" and can restart it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Fields that decide which batch comes at a given step: a resumed run must keep them.
DATA_ORDER_FIELDS = ("seed", "batch_size", "num_train")


class CheckpointError(ValueError):
    """A workdir whose checkpoint cannot be used with this config; one line naming the mismatch."""


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM arrived; the checkpoint at `step` was saved and the run should exit."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint saved")
        self.step = step


# ---------------------------------------------------------------------------------------------
# What is saved.


def state_tree(state) -> dict[str, Any]:
    """The TrainState's arrays as a plain tree (typed PRNG keys are stored as their raw data)."""
    return {"params": state.params, "opt_state": state.opt_state, "step": jnp.asarray(state.step),
            "dropout_key": jax.random.key_data(state.dropout_key)}


def data_position(step: int, steps_per_epoch: int, config: ml_collections.ConfigDict,
                  num_train: int) -> dict[str, int]:
    """Where in the data a step is, stored next to the state for people and for the resume check."""
    epoch, index = divmod(step, steps_per_epoch)
    return {"step": step, "epoch": epoch, "step_in_epoch": index,
            "steps_per_epoch": steps_per_epoch, "seed": config.seed,
            "batch_size": config.batch_size, "num_train": num_train}


def _path_name(path: tuple) -> str:
    """'params/Conv_0/kernel' for a tree path through dicts, lists or attributes."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_path_name(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 where: str) -> None:
    """Raises CheckpointError naming the first parameter whose name or shape differs."""
    params_first = sorted(set(saved) | set(expected), key=lambda n: (not n.startswith("params"), n))
    for name in params_first:
        if name not in saved:
            raise CheckpointError(f"{where}: the checkpoint has no {name} (the config's model has "
                                  f"shape {expected[name]}); another model or optimizer wrote it; "
                                  "use another --workdir or the config it was trained with")
        if name not in expected:
            raise CheckpointError(f"{where}: the checkpoint has {name} {saved[name]}, which the "
                                  "config's model does not; use another --workdir or the config "
                                  "it was trained with")
        if saved[name] != expected[name]:
            raise CheckpointError(f"{where}: {name} has shape {saved[name]} in the checkpoint but "
                                  f"{expected[name]} in the config's model; use another --workdir "
                                  "or the config it was trained with")


# ---------------------------------------------------------------------------------------------
# The manager.


def _drop_orbax_info(record: std_logging.LogRecord) -> bool:
    """Orbax logs ~30 INFO lines per save through absl, and warns that a read-only manager (ours,
    for restoring) is read-only; keep its other warnings and errors."""
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
        return True
    if record.exc_info:  # A failed save (e.g. a full disk): `save` reports it in one line.
        record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING and "read only" not in record.getMessage() and (
        "read_only=True" not in record.getMessage())


logging.get_absl_logger().addFilter(_drop_orbax_info)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints; saves only when told (the loop decides when)."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,  # Half-written saves of a killed run.
        create=not read_only,
        read_only=read_only,
    )
    # Handlers named up front, so a fresh manager can read metadata before any save or restore.
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), position=ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 handler_registry=registry)


def latest_step(workdir: str) -> int | None:
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        return manager.latest_step()


def save(manager: ocp.CheckpointManager, state, position: dict[str, int]) -> bool:
    """Writes the checkpoint for `state.step` (once: a second call at the same step is a no-op)."""
    step = position["step"]
    if manager.latest_step() == step:
        return False
    try:
        saved = manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree(state)),
            position=ocp.args.JsonSave(position)))
        manager.wait_until_finished()
    except (OSError, ValueError) as e:  # tensorstore reports a full disk as a ValueError.
        raise CheckpointError(_save_failed(manager, step, e)) from None
    return saved


def _save_failed(manager: ocp.CheckpointManager, step: int, e: Exception) -> str:
    """The one-line error for a failed save. The half-written save is a tmp directory that no
    restore reads (the next manager deletes it), so the newest complete checkpoint is intact."""
    message = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in message:
        reason = "no space left on device"
    else:
        reason = f"{type(e).__name__}: {(message.strip().splitlines() or [''])[0][:200]}"
    last = manager.latest_step()
    kept = f"the checkpoint at step {last} is intact" if last is not None else "no checkpoint yet"
    return (f"{manager.directory}: saving the checkpoint at step {step} failed ({reason}); {kept}; "
            "free space and run the same command to resume")


def restore(workdir: str, state, position: dict[str, int]):
    """The state of the newest checkpoint in `workdir`, or `state` unchanged when there is none.

    `state` is the freshly initialised state for this config: its shapes are compared with the
    checkpoint's before anything is read into it, and its shardings are where the arrays land.
    `position`'s data-order fields must match the checkpoint's. Reads only; never deletes.
    """
    step = latest_step(workdir)
    if step is None:
        return state
    where = os.path.join(checkpoint_dir(workdir), str(step))
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        saved_tree = manager.item_metadata(step)["state"].tree
        target = state_tree(state)
        check_shapes(tree_shapes(saved_tree), tree_shapes(target), where)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()))
    saved_position = restored["position"]
    for name in DATA_ORDER_FIELDS:
        if saved_position[name] != position[name]:
            raise CheckpointError(
                f"{where}: was trained with {name}={saved_position[name]} but this run has "
                f"{position[name]}; resuming would change the data order; use another --workdir "
                "or the same config and data")
    tree = restored["state"]
    return state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                         dropout_key=jax.random.wrap_key_data(tree["dropout_key"]))


def restore_params(workdir: str, expected_params: Any) -> tuple[Any, int]:
    """The newest checkpoint's params (shape-checked against `expected_params`) and its step."""
    step = latest_step(workdir)
    if step is None:
        raise CheckpointError(f"{checkpoint_dir(workdir)}: no checkpoint; train first with "
                              f"python -m mnist_flax.main --workdir={workdir}")
    where = os.path.join(checkpoint_dir(workdir), str(step))
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        saved = manager.item_metadata(step)["state"].tree["params"]
        check_shapes(tree_shapes({"params": saved}), tree_shapes({"params": expected_params}),
                     where)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    params = jax.tree.map(np.asarray, restored["state"]["params"])
    return params, step


# ---------------------------------------------------------------------------------------------
# One run per workdir.


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds an exclusive flock on workdir/.lock while the block runs, so a second run on the same
    workdir stops at once instead of interleaving its checkpoints and events with ours.

    The kernel drops the lock when the process dies, so a SIGKILLed run never blocks the next one.
    Only process 0 locks: it alone writes the config and events, and a pod's hosts share a workdir.
    """
    if jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise CheckpointError(f"another run (pid {pid}) is using --workdir={workdir}; wait "
                                  "for it or use another workdir") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# The config stored with the run.


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes workdir/config.json atomically (process 0 only); predict builds the model from it."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)  # train_and_evaluate may be called without main.
    path = config_path(workdir)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = config_path(workdir)
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {workdir} a training workdir?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """'name: old -> new' for every field that differs from the config stored in the workdir."""
    if not os.path.exists(config_path(workdir)):
        return []
    old = read_config(workdir).to_dict()
    new = json.loads(config.to_json())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------------------------------
# SIGTERM.


@dataclasses.dataclass
class SigtermFlag:
    """While installed, SIGTERM only sets `requested`; the loop saves and exits at the next step.

    A context manager: leaving it puts the previous handler back. Outside the main thread (where
    Python cannot install handlers) it does nothing and SIGTERM keeps its usual meaning.
    """

    requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    _previous: Callable | int | None = None

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested.set()

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def is_set(self) -> bool:
        return self.requested.is_set()


def log_preempted(step: int) -> None:
    logging.warning("SIGTERM: saved the checkpoint at step %d; exiting with status %d. Run the "
                    "same command again to resume.", step, PREEMPTED_EXIT_CODE)
