"""A checkpoint's sha256: of the position JSON and every array's name, dtype, shape and bytes. It
catches a damaged file (cut short, bytes flipped, emptied) even where tensorstore reads it without
complaint; no library checks what a checkpoint holds against what was saved."""

import hashlib
import json
from typing import Any

import jax
import numpy as np
from absl import logging

CHECKSUM_KEY = "sha256"  # In the position JSON: state_checksum of the tree and the position.
# The checksum hashes the dtypes JAX uses without x64, so JAX_ENABLE_X64=1 (which restores the
# step as int64) reads the same checkpoint as intact.
_HASHED_DTYPES = {np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
                  np.dtype(np.float64): np.float32}


def path_name(key_path: tuple) -> str:
    """'params/Conv_0/kernel' for a tree path through dicts, lists or attributes."""
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _host_array(leaf: Any) -> np.ndarray:
    """A leaf on the host; the state is replicated, so one local shard is the whole array."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_shards[0].data
    return np.asarray(leaf)


def state_checksum(tree: Any, position: dict[str, Any]) -> str:
    """sha256 over the position and every leaf's name, dtype, shape and bytes, in name order (so
    a raw tree orbax restores without a target, dicts for tuples, hashes the same)."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in position.items() if k != CHECKSUM_KEY},
                                       sort_keys=True).encode())
    leaves = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for name in sorted(leaves):
        array = _host_array(leaves[name])
        array = np.ascontiguousarray(array.astype(_HASHED_DTYPES.get(array.dtype, array.dtype)))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def damage(step: int, tree: Any, position: Any) -> str | None:
    """Why what was read at `step` is not what was saved there, in a few words, or None."""
    if not isinstance(position, dict) or "step" not in position:
        return "position JSON: not a data position"
    stored = position.get(CHECKSUM_KEY)
    if stored is None:  # Written before checksums existed: usable, but say it is unverified.
        logging.warning("The checkpoint at step %d has no checksum (written by an older "
                        "version); restoring it unverified", step)
    elif stored != state_checksum(tree, position):
        return "checksum mismatch: its contents are not what was saved"
    held = int(np.asarray(_host_array(tree["step"])))
    if position["step"] != step or held != step:
        return f"it holds step {held if held != step else position['step']}, not {step}"
    return None
