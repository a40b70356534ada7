"""Device placement: one mesh axis over every device of every host; the batch is split along it."""

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: the compiler propagates the batch sharding through the model (GSPMD), so the
    # model code stays free of sharding annotations.
    return jax.make_mesh((jax.device_count(),), ("batch",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(mesh: jax.sharding.Mesh,
                global_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A global batch (the same numpy arrays on every host) split over all devices: each host
    contributes only the rows of its own devices."""
    sharding = NamedSharding(mesh, P("batch"))
    n = len(next(iter(global_batch.values())))
    per_host = n // jax.process_count()
    start = jax.process_index() * per_host
    return {
        k: jax.make_array_from_process_local_data(sharding, v[start:start + per_host], v.shape)
        for k, v in global_batch.items()
    }


def put_replicated(mesh: jax.sharding.Mesh, array: np.ndarray) -> jax.Array:
    """The same numpy array on every host -> one global array with a full copy on every device.

    For data every device reads whole (the training set, an epoch's order): each host passes its
    own copy, so nothing crosses hosts.
    """
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), array, array.shape)


def replicate(mesh: jax.sharding.Mesh, tree: Any) -> Any:
    """A full copy of `tree` on every device of every host (the parameters, the optimizer state).

    A jitted identity rather than device_put: with several hosts, device_put cannot reach the
    other hosts' devices, while every host running the same jit builds the global array.
    """
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
