"""Host overhead of the training loop per step, before and after device-resident data, against
the floor of one empty jitted dispatch; and the same loop's images/s with the real model.

    python benchmarks/loop_overhead.py [--rounds=5] [--null_steps=936] [--real_steps=60]
        [--ks=1,4,16]

On a GPU/TPU a step of this CNN takes a fraction of a millisecond of device time, so what the host
does around the step decides the speed. This measures that host work with a *null step*: the real
loop's state (the tutorial CNN's TrainState, donated), data path and metrics handling, with the
step's math replaced by one that only moves the step counter. Loops, interleaved round by round
(the machine is shared; medians reported):

  floor    one empty jitted dispatch of a donated int32 scalar (and, for scale, of the TrainState).
  before   the loop as it was: per step `input_pipeline.batch_at` (numpy gather) +
           `sharding.shard_batch` (two host-to-device transfers) + the jitted step.
  after    `train.train_and_evaluate`'s loop: the data on the devices once
           (`fast.dispatch.device_dataset`), the epoch order once per epoch
           (`fast.dispatch.device_epoch_order`),
           dispatches of up to k steps (`progress.chunk_steps`, `fast.dispatch.run`) that gather
           their batches on the device. k=1 is the CPU default, 16 the GPU/TPU one.

Both loops keep metrics on device and log every 100 steps through `progress.Progress`, as
`train_and_evaluate` does. The real model runs the same two loops at the backend's default k
(`fast.steps_per_dispatch`). Images are random uint8 in MNIST's shapes. The last line is JSON:
{"overhead_us_per_step", "floor_us", "ratio_to_floor", "images_per_second", ...}: the null-step
overhead at the best k of --ks, the scalar floor, their ratio, and the real model's images/s
through the loop as this backend runs it; `before_us_per_step` and `k` ride along.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mnist_flax import configs, fast, input_pipeline, sharding, train
from mnist_flax import progress as progress_lib
from mnist_flax.fast import dispatch
from mnist_flax.run import process

BATCH = 128
NUM_TRAIN, NUM_TEST = 60_000, 10_000


def fake_dataset(seed: int = 0) -> input_pipeline.Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (NUM_TRAIN, *input_pipeline.IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, NUM_TRAIN).astype(np.int32)
    return input_pipeline.Dataset(images, labels, images[:NUM_TEST], labels[:NUM_TEST], "random")


def null_step_math(state: train.TrainState,
                   batch: train.Batch) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """`train_step`'s inputs and outputs without its math: only the step counter moves."""
    del batch
    zero = jnp.zeros((), jnp.float32)
    return state.replace(step=state.step + 1), {"loss": zero, "accuracy": zero}


null_step = jax.jit(null_step_math, donate_argnames="state",  # Built as train.train_step is.
                    compiler_options=fast.COMPILER_OPTIONS)


def floor_loops(state: train.TrainState) -> dict[str, Callable[[int], None]]:
    scalar_fn = jax.jit(lambda x: x + 1, donate_argnums=0)
    state_fn = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)
    holder = {"x": jnp.zeros((), jnp.int32), "state": state}

    def scalar(n: int) -> None:
        x = holder["x"]
        for _ in range(n):
            x = scalar_fn(x)
        holder["x"] = jax.block_until_ready(x)

    def tree(n: int) -> None:
        s = holder["state"]
        for _ in range(n):
            s = state_fn(s)
        holder["state"] = jax.block_until_ready(s)

    return {"floor: empty jit, donated scalar": scalar,
            f"floor: empty jit, donated TrainState ({len(jax.tree.leaves(state))} leaves)": tree}


class BeforeLoop:
    """The loop as it was: a numpy batch per step, sharded onto the devices, then the step."""

    def __init__(self, config, mesh, dataset, state, step_fn):
        self.config, self.mesh, self.dataset, self.state, self.step_fn = (
            config, mesh, dataset, state, step_fn)
        self.steps_per_epoch = len(dataset.train_labels) // BATCH

    def __call__(self, num_steps: int) -> None:
        state, start = self.state, int(self.state.step)
        progress = progress_lib.Progress(self.config, start + num_steps, self.steps_per_epoch,
                                         train.learning_rate_schedule(self.config))
        progress.start_epoch(start)
        for step in range(start, start + num_steps):
            batch = input_pipeline.batch_at(self.dataset, self.config.seed, step, BATCH)
            state, metrics = self.step_fn(state, sharding.shard_batch(self.mesh, batch))
            done = step + 1
            progress.add(metrics, done, done % self.steps_per_epoch == 0)
        self.state = jax.block_until_ready(state)


class AfterLoop:
    """`train_and_evaluate`'s data path and dispatch: device data, k steps per dispatch."""

    def __init__(self, config, mesh, data, state, k: int, step_fn=None):
        self.config, self.mesh, self.data, self.state, self.k, self.step_fn = (
            config, mesh, data, state, k, step_fn)
        self.num_train = len(data["label"])
        self.steps_per_epoch = self.num_train // BATCH
        self.order, self.order_epoch = None, None

    def __call__(self, num_steps: int) -> None:
        state, step = self.state, int(self.state.step)
        stop = step + num_steps
        progress = progress_lib.Progress(self.config, stop, self.steps_per_epoch,
                                         train.learning_rate_schedule(self.config))
        progress.start_epoch(step)
        while step < stop:
            epoch, index = divmod(step, self.steps_per_epoch)
            if self.order_epoch != epoch:
                self.order = dispatch.device_epoch_order(self.mesh, self.config.seed, epoch,
                                                      self.num_train)
                self.order_epoch = epoch
            n = progress_lib.chunk_steps(step, self.k, self.steps_per_epoch, stop, self.config)
            # The real step (step_fn None), exactly as train_and_evaluate runs it, or the null one.
            state, metrics = dispatch.run(self.step_fn or train.train_step_fn, state, self.data,
                                          self.order, num_steps=n, batch_size=BATCH,
                                          steps_per_epoch=self.steps_per_epoch, mesh=self.mesh)
            step += n
            progress.add(metrics, step, index + n == self.steps_per_epoch)
        self.state = jax.block_until_ready(state)


def interleaved(loops: dict[str, Callable[[int], None]], steps: int,
                rounds: int) -> dict[str, float]:
    """Median seconds per step of each loop; the loops run one after another in each round."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            start = time.perf_counter()
            loop(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def report(results: dict[str, float]) -> None:
    for name, seconds in results.items():
        print(f"  {name:<58} {seconds * 1e6:10.1f} us/step {BATCH / seconds:11.0f} images/s",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--null_steps", type=int, default=936, help="2 epochs of batch 128")
    parser.add_argument("--real_steps", type=int, default=60, help="real model, per round")
    parser.add_argument("--ks", default="1,4,16", help="steps per dispatch for the null step")
    args = parser.parse_args()
    process.tune_host_allocator()  # As main does, first thing.
    ks = [int(k) for k in args.ks.split(",")]
    config = configs.load()
    config.batch_size = BATCH
    mesh = sharding.make_mesh()
    dataset = fake_dataset()
    data = dispatch.device_dataset(mesh, dataset)
    backend_k = fast.steps_per_dispatch(config)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
          f"device(s), batch {BATCH}, default steps per dispatch here: {backend_k}", flush=True)

    def new_state():
        return sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))

    loops: dict[str, Callable[[int], None]] = floor_loops(new_state())
    loops["before: batch_at + shard_batch + null step"] = BeforeLoop(
        config, mesh, dataset, new_state(), null_step)
    for k in ks:
        loops[f"after: device data, null step, k={k}"] = AfterLoop(
            config, mesh, data, new_state(), k, null_step_math)
    print(f"Host overhead, null step ({args.null_steps} steps per round, median of "
          f"{args.rounds} rounds after a warm-up round):", flush=True)
    interleaved(loops, args.null_steps, 1)  # Compiles every chunk size.
    null = interleaved(loops, args.null_steps, args.rounds)
    report(null)

    real_after = f"after: device data, dispatch.run, k={backend_k}"
    real = {"before: batch_at + shard_batch + train_step": BeforeLoop(
                config, mesh, dataset, new_state(), train.train_step),
            real_after: AfterLoop(config, mesh, data, new_state(), backend_k)}
    print(f"Real model ({args.real_steps} steps per round, median of {args.rounds}):",
          flush=True)
    interleaved(real, min(args.real_steps, 10), 1)
    real_times = interleaved(real, args.real_steps, args.rounds)
    report(real_times)

    floor = null["floor: empty jit, donated scalar"]
    after = {k: null[f"after: device data, null step, k={k}"] for k in ks}
    best_k = min(after, key=after.get)
    before = null["before: batch_at + shard_batch + null step"]
    print(f"overhead per step: before {before * 1e6:.1f} us, after {after[best_k] * 1e6:.1f} us "
          f"at k={best_k} ({after[best_k] / floor:.2f}x the {floor * 1e6:.1f} us floor)")
    print(json.dumps({
        "overhead_us_per_step": round(after[best_k] * 1e6, 2),
        "floor_us": round(floor * 1e6, 2),
        "ratio_to_floor": round(after[best_k] / floor, 3),
        "images_per_second": round(BATCH / real_times[real_after], 1),
        "k": best_k,
        "before_us_per_step": round(before * 1e6, 2),
        "after_us_per_step_by_k": {k: round(v * 1e6, 2) for k, v in after.items()},
        "images_per_second_before": round(
            BATCH / real_times["before: batch_at + shard_batch + train_step"], 1),
    }))


if __name__ == "__main__":
    main()
