"""Checkpoints a run can trust: a restore walks back from the newest checkpoint to the newest
intact one (`checkpoints.read` checks each one's checksum), saying what it skips and why; damaged
ones are moved aside (checkpoints/damaged-<step>-<reason>), never deleted. A checkpoint that
vanishes while it is read was pruned by a run that is saving a newer one: busy, not damaged.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from mnist_flax import checkpoints
from mnist_flax.checkpoints import CheckpointError, DamagedError, checkpoint_dir
from mnist_flax.run import lock

DAMAGED_PREFIX = "damaged-"  # checkpoints/damaged-<step>-<reason>: set aside, never deleted.


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


def _walk_back(workdir: str, read: Any) -> tuple[Any, int, list[tuple[int, str]]]:
    """`read(manager, step, where)` on each checkpoint, newest first, until one is intact: what
    it returned, its step, and the damaged (step, reason) pairs skipped, each with a warning.
    CheckpointError (this config cannot use the checkpoint) stops at once. Reads only."""
    directory = checkpoint_dir(workdir)
    damaged: list[tuple[int, str]] = []
    for _ in range(5):  # A live run prunes at most one checkpoint per save.
        manager = checkpoints.create_manager(workdir, 1, read_only=True)
        try:
            steps = sorted(manager.all_steps(), reverse=True)
            for step in steps:
                if step in dict(damaged):
                    continue
                where = directory / str(step)
                try:
                    return read(manager, step, where), step, damaged
                except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
                    if isinstance(e, CheckpointError) and not isinstance(e, DamagedError):
                        raise  # This config cannot use it: not damage.
                    time.sleep(0.2)  # A live run's prune deletes file by file, then the dir.
                    manager.reload()
                    if step not in manager.all_steps() or not where.exists():
                        break  # Pruned while we read it: list again.
                    reason = str(e) if isinstance(e, CheckpointError) else _read_error(e)
                    logging.warning("%s: skipping the damaged checkpoint at step %d: %s", where,
                                    step, reason)
                    damaged.append((step, reason))
            else:
                break
        finally:
            manager.close()
    skipped = ", ".join(str(step) for step, _ in damaged)
    writer = lock.holder(workdir)
    if writer is not None:  # What failed may be a save or a prune in flight, not damage.
        raise CheckpointError(f"{directory}: a run (pid {writer}) is writing it and no checkpoint "
                              f"read back whole (step {skipped}); try again once it has saved")
    raise CheckpointError(
        f"{directory}: no intact checkpoint (damaged: step {skipped}); move that directory "
        f"aside to start afresh, or restore {workdir} from a backup")


def restore_intact(workdir: str, state, position: dict[str, int]):
    """`checkpoints.restore`, verified: the newest intact checkpoint's state (or `state` when
    there is none) and the damaged (step, reason) pairs skipped on the way. Reads only."""
    if checkpoints.latest_step(workdir) is None:
        return state, []
    target = checkpoints.state_tree(state)

    def read(manager, step, where):
        return checkpoints.read(manager, step, target, where)

    (tree, saved_position), step, damaged = _walk_back(workdir, read)
    where = checkpoint_dir(workdir) / str(step)
    return checkpoints.adopt(state, tree, saved_position, position, where), damaged


def restore_params(workdir: str, expected_params: Any) -> tuple[Any, int]:
    """The newest intact checkpoint's params (shape-checked against `expected_params`) and its
    step; damaged ones are skipped with a warning, as in `restore_intact`, and left in place.
    Serving's path (`predict.load`, a library call)."""
    def read(manager, step, where):
        saved_tree = manager.item_metadata(step)["state"].tree
        checkpoints.check_shapes(checkpoints.tree_shapes({"params": saved_tree["params"]}),
                                 checkpoints.tree_shapes({"params": expected_params}), where)
        # Onto this machine's first device: the saved shardings name the devices of the run that
        # wrote it (a pod slice's, say), which orbax cannot map onto another topology.
        one_device = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("device",))
        device = jax.sharding.NamedSharding(one_device, jax.sharding.PartitionSpec())
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              saved_tree)
        tree, _ = checkpoints.read(manager, step, target, where)
        return jax.tree.map(np.asarray, tree["params"])

    if checkpoints.latest_step(workdir) is None:
        raise CheckpointError(f"{checkpoint_dir(workdir)}: no checkpoint; train first with "
                              f"python -m mnist_flax.main --workdir={workdir}")
    params, step, _ = _walk_back(workdir, read)
    return params, step
