"""Whether k training steps in one dispatch (a `lax.scan`) round like k single dispatches.

    python benchmarks/dispatch_rounding.py [--steps=4] [--widths=4]

From one fresh state, `--steps` steps run both ways on synthetic digits, for a few model widths
(the tests' small ones and the tutorial's); prints, per width, whether the parameters and Adam
moments are bit-identical and the largest parameter difference. The last line is one JSON object.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from absl import app, flags

from mnist_flax import configs, input_pipeline, sharding, train
from mnist_flax.fast import dispatch

WIDTHS = [((2,), 4), ((4, 8), 16), ((8, 16), 16), ((32, 64), 128)]  # (conv, dense); last: tutorial.
flags.DEFINE_integer("steps", 4, "Steps per dispatch, against that many single dispatches.")
flags.DEFINE_integer("widths", len(WIDTHS), "How many of the widths, smallest first.",
                     lower_bound=1, upper_bound=len(WIDTHS))
N, BATCH = 512, 32


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def compare(conv: tuple[int, ...], dense: int, k: int) -> dict:
    config = configs.load()
    config.update(conv_features=conv, dense_features=dense, batch_size=BATCH)
    images, labels = _digits(N)
    dataset = input_pipeline.Dataset(images, labels, images[:10], labels[:10], "synthetic")
    mesh = sharding.make_mesh()
    data = dispatch.device_dataset(mesh, dataset)
    order = dispatch.device_epoch_order(mesh, config.seed, 0, N)
    run = dict(data=data, order=order, batch_size=BATCH, steps_per_epoch=N // BATCH, mesh=mesh)

    def fresh():
        state = train.create_train_state(config, jax.random.key(0), N // BATCH)
        return sharding.replicate(mesh, state)

    multi, _ = dispatch.run(train.train_step_fn, fresh(), num_steps=k, **run)
    single = fresh()
    for _ in range(k):
        single, _ = dispatch.run(train.train_step_fn, single, num_steps=1, **run)
    a, b = (jax.device_get((s.params, s.opt_state)) for s in (multi, single))
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    params = list(zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True))
    return {"conv_features": list(conv), "dense_features": dense, "steps": k,
            "bit_identical": all(np.array_equal(x, y) for x, y in pairs),
            "max_param_diff": max(float(np.max(np.abs(x.astype(np.float64) - y)))
                                  for x, y in params)}


def main(argv: list[str]) -> None:
    del argv
    results = [compare(conv, dense, flags.FLAGS.steps)
               for conv, dense in WIDTHS[:flags.FLAGS.widths]]
    for r in results:
        print(f"conv {tuple(r['conv_features'])} dense {r['dense_features']}: "
              f"{'bit-identical' if r['bit_identical'] else 'differs'}, largest parameter "
              f"difference {r['max_param_diff']:.3g}", file=sys.stderr)
    print(json.dumps({"backend": jax.default_backend(), "results": results}))


if __name__ == "__main__":
    app.run(main)
