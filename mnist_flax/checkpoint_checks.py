"""What a checkpoint read back is checked against: its shapes against this run's, and its sha256
against what was saved, which catches damage (cut short, bytes flipped) that tensorstore reads
without complaint; no library checks a checkpoint's contents."""

import hashlib
import json
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from mnist_flax import configs

CHECKSUM_KEY = "sha256"  # In the position JSON: state_checksum of the tree and the position.
# The dtypes JAX uses without x64: JAX_ENABLE_X64=1 (the step as int64) reads the same as intact.
_HASHED_DTYPES = {np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
                  np.dtype(np.float64): np.float32}


class CheckpointError(configs.UserError):
    """A workdir whose checkpoint cannot be used with this config; one line naming the mismatch."""


class DamagedError(CheckpointError):
    """A checkpoint whose contents are not what was saved; the message is the reason."""


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


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {path_name(p): np.shape(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 where: str | epath.Path) -> None:
    """Raises CheckpointError naming the first array whose name or shape differs, and what
    decides its shape: the config for the model and optimizer, JAX's PRNG for the dropout key."""
    for name in sorted(set(saved) | set(expected), key=lambda n: (not n.startswith("params"), n)):
        if name == "dropout_key" and saved.get(name) != expected.get(name):
            here = jax.config.jax_default_prng_impl
            raise CheckpointError(
                f"{where}: its dropout key has shape {saved.get(name)}, this process's "
                f"{expected.get(name)}: another PRNG implementation ({here} here) wrote it; run "
                "with the JAX_DEFAULT_PRNG_IMPL it was trained with")
        if name not in saved:
            why = (f"the checkpoint has no {name} (the config's model has shape "
                   f"{expected[name]}); another model or optimizer wrote it")
        elif name not in expected:
            why = f"the checkpoint has {name} {saved[name]}, which the config's model does not"
        elif saved[name] != expected[name]:
            why = (f"{name} has shape {saved[name]} in the checkpoint but {expected[name]} in the "
                   "config's model")
        else:
            continue
        raise CheckpointError(f"{where}: {why}; use another --workdir or the config it was "
                              "trained with")
