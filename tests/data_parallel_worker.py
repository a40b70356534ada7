"""Runs a few training steps on host-fed batches and through main's device-resident data path
on N devices (one or several processes).

Used by test_data_parallel.py in subprocesses, because the device count is fixed at JAX start-up:
    python tests/data_parallel_worker.py --devices=8 --steps=4
    python tests/data_parallel_worker.py --devices=2 --num_processes=2 --process_id=0 --port=P
Prints one JSON line: the per-step losses and the final parameters' checksums.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "  # The tests' own, and:
                           f"--xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402

if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import load_config, synthetic_digits  # noqa: E402

from mnist_flax import input_pipeline, sharding, train  # noqa: E402
from mnist_flax.fast import dispatch  # noqa: E402

config = load_config()
images, labels = synthetic_digits(1024)
dataset = input_pipeline.Dataset(images, labels, images[:256], labels[:256], "synthetic")
mesh = sharding.make_mesh()
state = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))
losses = []
for index in range(args.steps):
    batch = sharding.shard_batch(mesh, input_pipeline.batch_at(dataset, config.seed, index,
                                                               config.batch_size))
    assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("batch")
    state, metrics = train.train_step(state, batch)
    losses.append(float(metrics["loss"]))
# train_and_evaluate's path: the data on the devices, each device gathering its rows of the batch.
data = dispatch.device_dataset(mesh, dataset)
order = dispatch.device_epoch_order(mesh, config.seed, 0, len(labels))
loop_state = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))
loop_losses = []
for _ in range(args.steps):
    loop_state, metrics = dispatch.run(train.train_step_fn, loop_state, data, order, num_steps=1,
                                       batch_size=config.batch_size,
                                       steps_per_epoch=len(labels) // config.batch_size,
                                       mesh=mesh)
    loop_losses += [float(x) for x in np.ravel(jax.device_get(metrics["loss"]))]
loop_checksums = [float(np.abs(np.asarray(jax.device_get(p))).sum())
                  for p in jax.tree.leaves(loop_state.params)]
test = train.evaluate(state, dataset.test_images, dataset.test_labels, 128, mesh)
checksums = [float(np.abs(np.asarray(jax.device_get(p))).sum())
             for p in jax.tree.leaves(state.params)]
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "losses": losses, "checksums": checksums,
                  "test_loss": test["loss"], "loop_losses": loop_losses,
                  "loop_checksums": loop_checksums}))
