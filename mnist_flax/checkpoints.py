"""Checkpoints with orbax: the train state and its data position, saved, kept, restored.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact, and a save that fails (a full disk) stops
the run with one line naming the checkpoint that is intact. Saves are synchronous: the next
`train_step` donates (overwrites) the arrays a background save would still be reading.

Every checkpoint carries a sha256 of what it holds (the state's arrays and its data position),
stored in the position JSON and checked after each restore, so a damaged file (cut short, bytes
flipped, emptied, garbage) is caught even where tensorstore reads it without complaint. Restores
walk back from the newest checkpoint to the newest intact one, saying what they skip and why.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging as std_logging
import os
import re
import sys
from collections.abc import Sequence
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
CHECKSUM_KEY = "sha256"  # In the position JSON: state_checksum of the tree and the position.
DAMAGED_PREFIX = "damaged-"  # checkpoints/damaged-<step>-<reason>: set aside, never deleted.
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


def _host_array(leaf: Any) -> np.ndarray:
    """A leaf on the host; the state is replicated, so one local shard is the whole array."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_shards[0].data
    return np.asarray(leaf)


def state_checksum(tree: Any, position: dict[str, Any]) -> str:
    """sha256 over the position and every leaf's name, dtype, shape and bytes, in name order.

    Name order, not flatten order, so the raw tree orbax restores without a target (dicts where
    the state has tuples) hashes the same as the state it was saved from.
    """
    digest = hashlib.sha256(json.dumps({k: v for k, v in position.items() if k != CHECKSUM_KEY},
                                       sort_keys=True).encode())
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = {_path_name(path): leaf for path, leaf in flat}
    for name in sorted(leaves):
        array = np.ascontiguousarray(_host_array(leaves[name]))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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
    for restoring) is read-only; keep its other warnings and errors, except the one its metadata
    thread logs when a second Ctrl-C stopped a save and the process is exiting (cli says so)."""
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
        return True
    if record.exc_info:  # A failed save (e.g. a full disk): `save` reports it in one line.
        record.exc_info, record.exc_text = None, None
    message = record.getMessage()
    return record.levelno >= std_logging.WARNING and "read only" not in message and (
        "read_only=True" not in message) and "cannot schedule new futures after shutdown" not in (
        message)


def _orbax_aftermath(unraisable: Any) -> bool:
    """True for the tracebacks orbax leaves after a failed read or write, which it has already
    raised as an exception: when one tensorstore operation fails, orbax's event loop stops and is
    closed while the others are still in flight; as each finishes, tensorstore's callback finds the
    loop closed ('Event loop is closed'), and the abandoned read coroutines are finalised with
    their errors. Python reports both through sys.unraisablehook, one traceback each."""
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def quiet_orbax_logging() -> None:
    """Keeps orbax's INFO chatter out of the log, and the tracebacks its event loop leaves behind
    after a failed read or write (already reported as one line); entry points call it once."""
    logger = logging.get_absl_logger()
    if _drop_orbax_info not in logger.filters:
        logger.addFilter(_drop_orbax_info)
    asyncio_logger = std_logging.getLogger("asyncio")
    if _drop_orbax_task_errors not in asyncio_logger.filters:
        asyncio_logger.addFilter(_drop_orbax_task_errors)
    if not isinstance(sys.unraisablehook, _UnraisableFilter):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)


def _drop_orbax_task_errors(record: std_logging.LogRecord) -> bool:
    """The same aftermath through asyncio's logger: 'Task exception was never retrieved' for an
    orbax read task that was abandoned when another read failed first (timing decides which)."""
    error = record.exc_info[1] if record.exc_info else None
    tb = error.__traceback__ if error is not None else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


class _UnraisableFilter:
    """sys.unraisablehook without `_orbax_aftermath`; everything else goes to the previous hook."""

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not _orbax_aftermath(unraisable):
            self.previous(unraisable)


def checkpoint_dir(workdir: str) -> epath.Path:
    return workdir_lib.path(workdir) / CHECKPOINT_DIR


def create_manager(workdir: str, keep: int, read_only: bool = False,
                   set_aside: Sequence[tuple[int, str]] = ()) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints; saves only when told (the loop decides when).

    `set_aside` lists (step, reason) of damaged checkpoints that `restore_intact` skipped: a
    writing manager first moves them to checkpoints/damaged-<step>-<reason> (never deleting
    them), or orbax would count them among the newest `keep` and delete intact ones for them.
    """
    if not read_only and jax.process_index() == 0:  # The one process that writes the workdir.
        for step, reason in set_aside:
            move_aside(workdir, step, reason)
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


def move_aside(workdir: str, step: int, reason: str) -> epath.Path:
    """Renames a damaged checkpoint out of orbax's sight, to damaged-<step>-<reason>[~n]."""
    source = checkpoint_dir(workdir) / str(step)
    slug = re.sub(r"[^a-z0-9]+", "-", reason.split(":")[0].lower()).strip("-")[:40]
    target = checkpoint_dir(workdir) / f"{DAMAGED_PREFIX}{step}-{slug or 'damaged'}"
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.rsplit('~', 1)[0]}~{n}")
    source.rename(target)
    logging.warning("Moved the damaged checkpoint at step %d aside to %s (kept, not deleted)",
                    step, target)
    return target


def save(manager: ocp.CheckpointManager, state, position: dict[str, int]) -> bool:
    """Writes the checkpoint for `state.step` (once: a second call at the same step is a no-op),
    with the checksum of its contents in the position JSON."""
    step = position["step"]
    if manager.latest_step() == step:
        return False
    tree = state_tree(state)
    position = {**position, CHECKSUM_KEY: state_checksum(tree, position)}
    try:
        saved = manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            position=ocp.args.JsonSave(position)))
        manager.wait_until_finished()
    except (OSError, ValueError) as e:  # tensorstore reports a full disk as a ValueError.
        raise CheckpointError(_save_failed(manager, step, e)) from None
    return saved


def _read_error(e: BaseException) -> str:
    """Why orbax could not read a checkpoint, in one line: the innermost cause (tensorstore's
    'OUT_OF_RANGE: ...' under orbax's 'Encountered error while reading array'), without paths."""
    while True:
        inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if inner is None:
            break
        e = inner
    message = (str(e).strip().splitlines() or [""])[0].split("{")[0]
    message = re.sub(r' (in OCDBT database )?at local file "[^"]*"', "", message)
    return f"unreadable ({type(e).__name__}: {message[:150].strip()})"


def _save_failed(manager: ocp.CheckpointManager, step: int, e: Exception) -> str:
    """The one-line error for a failed save. The half-written save is a tmp directory that no
    restore reads (the next manager deletes it), so the newest complete checkpoint is intact."""
    message = str(e)
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in message
    if full:
        reason = "no space left on device"
    else:
        reason = workdir_lib.error_line(e, limit=160)
    try:
        last = manager.latest_step()
    except Exception:  # noqa: BLE001 (storage unreachable: the listing fails too)
        last = None
    kept = f"the checkpoint at step {last} is intact" if last is not None else "no checkpoint yet"
    fix = "free space" if full else "fix that (is the storage reachable?)"
    return (f"{manager.directory}: saving the checkpoint at step {step} failed ({reason}); {kept}; "
            f"{fix} and run the same command to resume")


def _verified(step: int, tree: Any, position: dict[str, Any], where: epath.Path) -> None:
    """Raises _Damaged when the checksum stored with the checkpoint differs from its contents."""
    if not isinstance(position, dict) or "step" not in position:
        raise _Damaged("position JSON: not a data position")
    stored = position.get(CHECKSUM_KEY)
    if stored is None:  # Written before checksums existed: usable, but say it is unverified.
        logging.warning("%s: the checkpoint at step %d has no checksum (written by an older "
                        "version); restoring it unverified", where, step)
        return
    if stored != state_checksum(tree, position):
        raise _Damaged("checksum mismatch: its contents are not what was saved")
    if position["step"] != step or int(np.asarray(_host_array(tree["step"]))) != step:
        raise _Damaged(f"it holds step {position['step']}, not {step}")


class _Damaged(Exception):  # noqa: N818 (a reason, not an error for users)
    """A checkpoint that cannot be trusted; the message is the reason, in a few words."""


def _walk_back(workdir: str, read: Any) -> tuple[Any, int, list[tuple[int, str]]]:
    """`read(manager, step, where)` on each checkpoint, newest first, until one is intact.

    A checkpoint whose files orbax or tensorstore cannot read, or whose checksum differs, is
    damaged: one warning line names it and why, and the next older one is tried. CheckpointError
    (this config cannot use the checkpoint) is not damage and stops at once. Returns what `read`
    returned, its step, and the damaged (step, reason) pairs; raises CheckpointError when no
    checkpoint is intact. Reads only.
    """
    directory = checkpoint_dir(workdir)
    damaged: list[tuple[int, str]] = []
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            where = directory / str(step)
            try:
                return read(manager, step, where), step, damaged
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
                reason = str(e) if isinstance(e, _Damaged) else _read_error(e)
                logging.warning("%s: skipping the damaged checkpoint at step %d: %s", where, step,
                                reason)
                damaged.append((step, reason))
    skipped = ", ".join(str(step) for step, _ in damaged)
    raise CheckpointError(
        f"{directory}: no intact checkpoint (damaged: step {skipped}); move that directory "
        f"aside to start afresh, or restore {workdir} from a backup")


def restore_intact(workdir: str, state, position: dict[str, int]):
    """The state of the newest intact checkpoint in `workdir` and the damaged (step, reason)
    pairs skipped on the way; `state` unchanged and none when there is no checkpoint.

    `state` is the freshly initialised state for this config: its shapes are compared with the
    checkpoint's before anything is read into it, and its shardings are where the arrays land.
    `position`'s data-order fields must match the checkpoint's. Reads only; never deletes.
    """
    if not checkpoint_dir(workdir).is_dir() or latest_step(workdir) is None:
        return state, []
    target = state_tree(state)

    def read(manager, step, where):
        saved_tree = manager.item_metadata(step)["state"].tree
        check_shapes(tree_shapes(saved_tree), tree_shapes(target), where)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()))
        _verified(step, restored["state"], restored["position"], where)
        return restored

    restored, step, damaged = _walk_back(workdir, read)
    saved_position = restored["position"]
    where = checkpoint_dir(workdir) / str(step)
    for name in DATA_ORDER_FIELDS:
        if saved_position[name] != position[name]:
            raise CheckpointError(
                f"{where}: was trained with {name}={saved_position[name]} but this run has "
                f"{position[name]}; resuming would change the data order; use another --workdir "
                "or the same config and data")
    tree = restored["state"]
    return state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                         dropout_key=jax.random.wrap_key_data(tree["dropout_key"])), damaged


def restore(workdir: str, state, position: dict[str, int]):
    """`restore_intact` without the list of damaged checkpoints."""
    return restore_intact(workdir, state, position)[0]


def restore_params(workdir: str, expected_params: Any) -> tuple[Any, int]:
    """The newest intact checkpoint's params (shape-checked against `expected_params`) and its
    step; damaged ones are skipped with a warning, as in `restore_intact`, and left in place."""
    if latest_step(workdir) is None:
        raise CheckpointError(f"{checkpoint_dir(workdir)}: no checkpoint; train first with "
                              f"python -m mnist_flax.main --workdir={workdir}")

    def read(manager, step, where):
        saved_tree = manager.item_metadata(step)["state"].tree
        check_shapes(tree_shapes({"params": saved_tree["params"]}),
                     tree_shapes({"params": expected_params}), where)
        # Onto this machine's first device: the saved shardings name the devices of the run that
        # wrote it (a pod slice's, say), which orbax cannot map onto another topology.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              saved_tree)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()))
        _verified(step, restored["state"], restored["position"], where)
        return jax.tree.map(np.asarray, restored["state"]["params"])

    params, step, _ = _walk_back(workdir, read)
    return params, step
