"""Where the training step's time goes: each piece of the default step timed on its own.

    python benchmarks/profile_step.py [--rounds=8]

The pieces are the ones the step is made of (batch 128, the tutorial CNN, fast/ops.py's forms,
compiled with fast.COMPILER_OPTIONS), plus the forms they replaced, for comparison. Each is
jitted alone and the pieces are interleaved round by round; medians of wall and CPU milliseconds
(CPU ms ~ 2x wall when both cores are busy). The full step is timed the same way, so the sum of
the pieces can be checked against it; so is the step with best.py's augmentation, as the training
loop runs it (warp in a jit of its own) and as it ran before (warp traced into the step's jit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_flax import fast
from mnist_flax.fast import dispatch, ops
from mnist_flax.run import process


def _random(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _grads(fun, num_params: int):
    """(args..., cotangent) -> gradients of fun wrt its first `num_params` args."""
    def run(*args):
        *inputs, cotangent = args
        params, rest = inputs[:num_params], inputs[num_params:]
        _, vjp = jax.vjp(lambda *p: fun(*p, *rest), *params)
        return vjp(cotangent)
    return run


def pieces() -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.random((128, 28, 28, 1), np.float32))
    k1, b1, dy1 = _random(rng, 3, 3, 1, 32), _random(rng, 32), _random(rng, 128, 26, 26, 32)
    x1, k2, b2 = _random(rng, 128, 26, 26, 32), _random(rng, 3, 3, 32, 64), _random(rng, 64)
    dy2, pooled = _random(rng, 128, 24, 24, 64), _random(rng, 128, 12, 12, 64)
    h, w, dh = _random(rng, 128, 9216), _random(rng, 9216, 128), _random(rng, 128, 128)
    params = jax.tree.map(jnp.asarray, {
        "conv1": k1, "conv2": k2, "dense1": w, "dense2": _random(rng, 128, 10)})
    tx = optax.adam(1e-3, eps=1e-7)

    def adam(p, g, opt_state):
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    def flax_pool(a):
        return nn.max_pool(a, (2, 2), strides=(2, 2))

    def dropout_masks(key):
        return (jax.random.bernoulli(key, 0.75, (128, 12, 12, 64)),
                jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (128, 128)))

    return {
        "conv1 forward + relu (9 taps)": (lambda x, k, b: jax.nn.relu(ops.conv2d(x, k, b)),
                                          (x0, k1, b1)),
        "conv1 weight+bias gradient": (_grads(lambda k, b, x: ops.conv2d(x, k, b), 2),
                                       (k1, b1, x0, dy1)),
        "conv2 forward + relu": (lambda x, k, b: jax.nn.relu(ops.conv2d(x, k, b)), (x1, k2, b2)),
        "conv2 input gradient": (_grads(lambda x, k, b: ops.conv2d(x, k, b), 1),
                                 (x1, k2, b2, dy2)),
        "conv2 weight+bias gradient": (_grads(lambda k, b, x: ops.conv2d(x, k, b), 2),
                                       (k2, b2, x1, dy2)),
        "relu backward 26x26x32": (lambda a, g: jnp.where(a > 0, g, 0), (dy1, dy1)),
        "max pool forward+backward (ops)": (_grads(ops.max_pool_2x2, 1), (dy2, pooled)),
        "  (flax nn.max_pool, replaced)": (_grads(flax_pool, 1), (dy2, pooled)),
        "dense 9216->128 forward+backward": (_grads(lambda h, w: h @ w, 2), (h, w, dh)),
        "dropout masks (threefry)": (dropout_masks, (jax.random.key(0),)),
        "adam update (1.2M params)": (adam, (params, params, tx.init(params))),
    }


def full_step(augmented: bool = False, fused: bool = False):
    """The real train_step of the default config, on a fixed batch.

    `augmented` adds best.py's random warp, as the training loop runs it (a jit of its own, then
    `train.train_step`: `fast.dispatch`); `fused` traces the warp into the step's jit instead,
    the form that replaced.
    """
    from mnist_flax import configs, train

    config = configs.load()
    if augmented:  # Only the warp of experiments/best.py, on the tutorial's model.
        best = configs.load(os.path.join(os.path.dirname(__file__), "..", "experiments", "best.py"))
        config.update({key: best[key] for key in best if key.startswith("augment_")})
    state = train.create_train_state(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (128, 28, 28, 1), np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, 128).astype(np.int32))}
    holder = {"state": state}
    augment = jax.jit(dispatch.augment_batch, compiler_options=fast.COMPILER_OPTIONS)

    def step_fn(s, b):
        return train.train_step(s, augment(s, b) if augmented else b)

    if fused:
        step_fn = jax.jit(lambda s, b: train.train_step_fn(s, dispatch.augment_batch(s, b)),
                          compiler_options=fast.COMPILER_OPTIONS)

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        return metrics

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    process.tune_host_allocator()  # As main does, before JAX runs anything.
    options = fast.COMPILER_OPTIONS
    jobs = {}
    for name, (fun, inputs) in pieces().items():
        jitted = jax.jit(fun, compiler_options=options or None)
        jax.block_until_ready(jitted(*inputs))
        jobs[name] = (jitted, inputs)
    for name, step in (("FULL train_step (default config)", full_step()),
                       ("  FULL, best.py's warp apart (now)", full_step(augmented=True)),
                       ("  FULL, warp in the step (replaced)", full_step(True, fused=True))):
        jax.block_until_ready(step())
        jobs[name] = (step, ())
    wall = {name: [] for name in jobs}
    cpu = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, (fun, inputs) in jobs.items():
            for _ in range(3):
                w0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(fun(*inputs))
                wall[name].append(1e3 * (time.perf_counter() - w0))
                cpu[name].append(1e3 * (time.process_time() - c0))
    print(f"{'piece':36} {'wall ms':>8} {'CPU ms':>8}")
    total_wall = total_cpu = 0.0
    for name in jobs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        if not name.startswith(("  ", "FULL")):
            total_wall, total_cpu = total_wall + w, total_cpu + c
        if name.startswith("FULL"):  # The default step, after its pieces.
            print(f"{'sum of the pieces above':36} {total_wall:8.1f} {total_cpu:8.1f}")
        print(f"{name:36} {w:8.1f} {c:8.1f}")


if __name__ == "__main__":
    main()
