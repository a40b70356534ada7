"""Checkpoints with orbax: the train state and its data position, saved, kept, restored.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact, and a save that fails (a full disk) stops
the run with one line naming the checkpoint that is intact. Saves are synchronous: the next
`train_step` donates (overwrites) the arrays a background save would still be reading.
"""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mnist_flax import workdir as workdir_lib

CHECKPOINT_DIR = "checkpoints"  # Under the workdir.
# Fields that decide which batch comes at a given step: a resumed run must keep them.
DATA_ORDER_FIELDS = ("seed", "batch_size", "num_train")


class CheckpointError(ValueError):
    """A workdir whose checkpoint cannot be used with this config; one line naming the mismatch."""


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
                 where: str | epath.Path) -> None:
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


def quiet_orbax_logging() -> None:
    """Keeps orbax's INFO chatter out of the log; entry points call it once, first thing."""
    logger = logging.get_absl_logger()
    if _drop_orbax_info not in logger.filters:
        logger.addFilter(_drop_orbax_info)


def checkpoint_dir(workdir: str) -> epath.Path:
    return workdir_lib.path(workdir) / CHECKPOINT_DIR


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
    if not checkpoint_dir(workdir).is_dir():
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
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in message
    if full:
        reason = "no space left on device"
    else:
        reason = f"{type(e).__name__}: {(message.strip().splitlines() or [''])[0][:200]}"
    try:
        last = manager.latest_step()
    except Exception:  # noqa: BLE001 (storage unreachable: the listing fails too)
        last = None
    kept = f"the checkpoint at step {last} is intact" if last is not None else "no checkpoint yet"
    fix = "free space" if full else "fix that (is the storage reachable?)"
    return (f"{manager.directory}: saving the checkpoint at step {step} failed ({reason}); {kept}; "
            f"{fix} and run the same command to resume")


def restore(workdir: str, state, position: dict[str, int]):
    """The state of the newest checkpoint in `workdir`, or `state` unchanged when there is none.

    `state` is the freshly initialised state for this config: its shapes are compared with the
    checkpoint's before anything is read into it, and its shardings are where the arrays land.
    `position`'s data-order fields must match the checkpoint's. Reads only; never deletes.
    """
    step = latest_step(workdir)
    if step is None:
        return state
    where = checkpoint_dir(workdir) / str(step)
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
    where = checkpoint_dir(workdir) / str(step)
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        saved_tree = manager.item_metadata(step)["state"].tree
        check_shapes(tree_shapes({"params": saved_tree["params"]}),
                     tree_shapes({"params": expected_params}), where)
        # Onto this machine's first device: the saved shardings name the devices of the run that
        # wrote it (a pod slice's, say), which orbax cannot map onto another topology.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              saved_tree)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
    params = jax.tree.map(np.asarray, restored["state"]["params"])
    return params, step
