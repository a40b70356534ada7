"""Checkpoints a run can trust: a sha256 of what each holds, checked after every restore; a
restore walks back from the newest checkpoint to the newest intact one, saying what it skips and
why; damaged ones are moved aside (checkpoints/damaged-<step>-<reason>), never deleted.

The checksum, stored in the position JSON, catches a damaged file (cut short, bytes flipped,
emptied, garbage) even where tensorstore reads it without complaint. A checkpoint that vanishes
while it is read was pruned by a run that is saving a newer one: busy, not damaged.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from mnist_flax import checkpoints
from mnist_flax.checkpoints import CheckpointError, checkpoint_dir
from mnist_flax.run import lock, logs

CHECKSUM_KEY = "sha256"  # In the position JSON: state_checksum of the tree and the position.
DAMAGED_PREFIX = "damaged-"  # checkpoints/damaged-<step>-<reason>: set aside, never deleted.
# The checksum hashes the dtypes JAX uses without x64, so JAX_ENABLE_X64=1 (which restores the
# step as int64) reads the same checkpoint as intact.
_HASHED_DTYPES = {np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
                  np.dtype(np.float64): np.float32}


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
    leaves = {checkpoints.path_name(path): leaf for path, leaf in flat}
    for name in sorted(leaves):
        array = _host_array(leaves[name])
        array = np.ascontiguousarray(array.astype(_HASHED_DTYPES.get(array.dtype, array.dtype)))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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
    held = int(np.asarray(_host_array(tree["step"])))
    if position["step"] != step or held != step:
        raise _Damaged(f"it holds step {held if held != step else position['step']}, not {step}")


class _Damaged(Exception):  # noqa: N818 (a reason, not an error for users)
    """A checkpoint that cannot be trusted; the message is the reason, in a few words."""


def _walk_back(workdir: str, read: Any) -> tuple[Any, int, list[tuple[int, str]]]:
    """`read(manager, step, where)` on each checkpoint, newest first, until one is intact.

    A checkpoint whose files orbax or tensorstore cannot read, or whose checksum differs, is
    damaged: one warning line names it and why, and the next older one is tried. One that is gone
    once the read failed was pruned by a live run that saved a newer one: busy, so the listing is
    read again. CheckpointError (this config cannot use the checkpoint) stops at once. Returns
    what `read` returned, its step, and the damaged (step, reason) pairs. Reads only.
    """
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
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
                    time.sleep(0.2)  # A live run's prune deletes file by file, then the dir.
                    manager.reload()
                    if step not in manager.all_steps() or not where.exists():
                        break  # Pruned while we read it: list again.
                    reason = str(e) if isinstance(e, _Damaged) else _read_error(e)
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
        tree, saved_position = checkpoints.read(manager, step, target, where)
        _verified(step, tree, saved_position, where)
        return tree, saved_position

    (tree, saved_position), step, damaged = _walk_back(workdir, read)
    where = checkpoint_dir(workdir) / str(step)
    return checkpoints.adopt(state, tree, saved_position, position, where), damaged


def restore_params(workdir: str, expected_params: Any) -> tuple[Any, int]:
    """The newest intact checkpoint's params (shape-checked against `expected_params`) and its
    step; damaged ones are skipped with a warning, as in `restore_intact`, and left in place.
    Serving's path (`predict.load`, a library call): orbax's notices that its readers are read
    only stay out of the caller's log; its other warnings do not."""
    with logs.read_only_notices_dropped():
        return _restore_params(workdir, expected_params)


def _restore_params(workdir: str, expected_params: Any) -> tuple[Any, int]:
    if checkpoints.latest_step(workdir) is None:
        raise CheckpointError(f"{checkpoint_dir(workdir)}: no checkpoint; train first with "
                              f"python -m mnist_flax.main --workdir={workdir}")

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
        tree, saved_position = checkpoints.read(manager, step, target, where)
        _verified(step, tree, saved_position, where)
        return jax.tree.map(np.asarray, tree["params"])

    params, step, _ = _walk_back(workdir, read)
    return params, step
