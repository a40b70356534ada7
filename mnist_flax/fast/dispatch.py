"""The training data on the devices, and `num_steps` training steps per dispatch.

The host sends nothing per step: the training split and each epoch's order live on the devices,
and a step gathers its batch at `state.step` (a resumed run replays it). One step is two jits, the
batch then the step (else XLA:CPU fuses the gather and the warp into the first convolution and
recomputes them there); k > 1 steps (GPU/TPU, `fast.steps_per_dispatch`) are one `lax.scan`.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_flax import augment, input_pipeline, sharding
from mnist_flax.fast import COMPILER_OPTIONS

Batch = dict[str, jax.Array]
StepFn = Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]


def device_dataset(mesh: jax.sharding.Mesh, dataset: input_pipeline.Dataset) -> Batch:
    """The training split on every device, once (uint8: 47 MB for MNIST)."""
    return {"image": sharding.put_replicated(mesh, dataset.train_images),
            "label": sharding.put_replicated(mesh, dataset.train_labels)}


def device_epoch_order(mesh: jax.sharding.Mesh, seed: int, epoch: int, n: int) -> jax.Array:
    """`input_pipeline.epoch_permutation` on every device, once per epoch."""
    order = input_pipeline.epoch_permutation(seed, epoch, n).astype(np.int32)
    return sharding.put_replicated(mesh, order)


def augment_batch(state: Any, batch: Batch) -> Batch:
    """The batch warped by `state.augmentation`, keyed by the step; pixels stay 0-255 (float32)."""
    key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, state.step), 1)
    images = augment.random_affine(key, batch["image"].astype(jnp.float32), state.augmentation)
    return {**batch, "image": images}


def _batch(state: Any, data: Batch, order: jax.Array, batch_size: int, steps_per_epoch: int,
           mesh: jax.sharding.Mesh | None) -> Batch:
    """`input_pipeline.batch_at`'s batch of step `state.step`, gathered on the device."""
    batch_sharding = NamedSharding(mesh, P("batch")) if mesh is not None else None
    index = state.step % steps_per_epoch
    batch = input_pipeline.gather_batch(data, order, index, batch_size, batch_sharding)
    return augment_batch(state, batch) if state.augmentation.enabled else batch


device_batch = jax.jit(_batch, static_argnums=(3, 4, 5), compiler_options=COMPILER_OPTIONS)


@functools.partial(jax.jit, donate_argnums=1, static_argnums=(0, 4, 5, 6, 7),
                   compiler_options=COMPILER_OPTIONS)
def train_steps(step_fn: StepFn, state: Any, data: Batch, order: jax.Array, num_steps: int,
                batch_size: int, steps_per_epoch: int,
                mesh: jax.sharding.Mesh | None) -> tuple[Any, dict[str, jax.Array]]:
    """`num_steps` steps of the plain `step_fn` in one `lax.scan`; metrics (num_steps,) each."""
    def one(state: Any, _) -> tuple[Any, dict[str, jax.Array]]:
        batch = _batch(state, data, order, batch_size, steps_per_epoch, mesh)
        return step_fn(state, lax.optimization_barrier(batch))  # Not fused into the convs.

    return lax.scan(one, state, length=num_steps)


# One jit per step function, as a module-level jit would be.
_jitted = functools.cache(lambda step_fn: jax.jit(step_fn, donate_argnums=0,
                                                  compiler_options=COMPILER_OPTIONS))


def run(step_fn: StepFn, state: Any, data: Batch, order: jax.Array, *, num_steps: int,
        batch_size: int, steps_per_epoch: int,
        mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict[str, jax.Array]]:
    """What the loop runs for `num_steps` steps (never past an epoch end) of the plain `step_fn`:
    one jitted step on one device batch, or a scan. Metrics: scalars, or (num_steps,) arrays."""
    if num_steps == 1:
        batch = device_batch(state, data, order, batch_size, steps_per_epoch, mesh)
        return _jitted(step_fn)(state, batch)
    return train_steps(step_fn, state, data, order, num_steps, batch_size, steps_per_epoch, mesh)


def step_flops(step_fn: StepFn, state: Any, data: Batch, batch_size: int) -> float | None:
    """One step's FLOPs on a global batch by XLA's count (or None); `run` reuses the trace."""
    dtype = jnp.float32 if state.augmentation.enabled else data["image"].dtype  # augment_batch.
    batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), dtype if k == "image" else v.dtype,
                                     sharding=NamedSharding(v.sharding.mesh, P("batch")))
             for k, v in data.items()}
    cost = _jitted(step_fn).lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # A list of one on older jax.
    return float(cost["flops"]) if cost and cost.get("flops", 0) > 0 else None
