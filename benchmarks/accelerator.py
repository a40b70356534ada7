"""One command for the first time a GPU or TPU is at hand: how fast is the step, and main's loop?

    python benchmarks/accelerator.py [--workdir=/tmp/mnist_flax_accel] [--epochs=2] [--repeats=20]
        [--config.x=y ...]

On whatever device JAX finds (one GPU, a TPU VM's chips, or the CPU), with the data main would use
($MNIST_DATA_DIR, else the packaged sample):
  compile_s          compiling one dispatch of the step (`fast.steps_per_dispatch` steps);
  step_device_us     per step, that compiled dispatch run back to back (`--repeats` times), waited
                     for: the device's time with the host's dispatch overlapped;
  images_per_second  through `train.train_and_evaluate` itself (main's loop, default steps per
                     dispatch), the last epoch's, as TensorBoard shows it;
  host_us_per_step   what the loop adds per step beyond the device's time (on a CPU, where the
                     host is the device, noise around 0, negative too);
  tflops_per_device  and `utilization` where the peak is known (`profiling.PEAK_TFLOPS`);
  profile            where the loop's trace of 10 steps is (TensorBoard's PROFILE tab, `profile`
                     extra).
The last line printed is that JSON object, with `device`, `devices`, `k` and `batch_size`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from mnist_flax import configs, event_reader, fast, input_pipeline, profiling, sharding, train
from mnist_flax.fast import dispatch

flags.DEFINE_string("workdir", "/tmp/mnist_flax_accelerator", "Replaced at every start.")
flags.DEFINE_integer("epochs", 2, "Epochs through main's loop (the last one's speed counts).")
flags.DEFINE_integer("repeats", 20, "Dispatches timed back to back for the step's device time.")
config_flags.DEFINE_config_file("config", configs.DEFAULT, "The config, as main takes it.")
FLAGS = flags.FLAGS


def device_step_seconds(config, dataset, k: int, repeats: int) -> tuple[float, float]:
    """(compile seconds, seconds per step) of one dispatch of k steps on the device data."""
    mesh = sharding.make_mesh()
    state = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))
    data = dispatch.device_dataset(mesh, dataset)
    order = dispatch.device_epoch_order(mesh, config.seed, 0, len(dataset.train_labels))
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    k = min(k, steps_per_epoch)
    run = lambda state: dispatch.run(train.train_step_fn, state, data, order,  # noqa: E731
                                     num_steps=k, batch_size=config.batch_size,
                                     steps_per_epoch=steps_per_epoch, mesh=mesh)
    start = time.perf_counter()
    state = jax.block_until_ready(run(state))[0]  # Compiles (and runs once).
    compile_s = time.perf_counter() - start
    state = jax.block_until_ready(run(state))[0]
    start = time.perf_counter()
    for _ in range(repeats):
        state, metrics = run(state)
    jax.block_until_ready((state, metrics))
    return compile_s, (time.perf_counter() - start) / (repeats * k)


def main(argv: list[str]) -> None:
    del argv
    config = FLAGS.config
    config.num_epochs, config.profile_steps = FLAGS.epochs, 10
    config.compilation_cache_dir = ""  # Compile time measured, not loaded.
    k = fast.steps_per_dispatch(config)
    dataset = input_pipeline.load_dataset(config)
    compile_s, step_s = device_step_seconds(config, dataset, k, FLAGS.repeats)

    shutil.rmtree(FLAGS.workdir, ignore_errors=True)
    train.train_and_evaluate(config, FLAGS.workdir)
    last = {tag: event_reader.read_scalars(os.path.join(FLAGS.workdir, "train"), tag)[-1][1]
            for tag in ("speed/images_per_second", "speed/tflops_per_device")}
    images_per_second = last["speed/images_per_second"]
    device = jax.devices()[0]
    peak = profiling.peak_tflops(device.device_kind, config.compute_dtype)
    profile = profiling.profile_root(FLAGS.workdir)
    print(json.dumps({
        "device": device.device_kind, "devices": jax.device_count(), "k": k,
        "batch_size": config.batch_size, "compile_s": round(compile_s, 3),
        "step_device_us": round(step_s * 1e6, 1),
        "images_per_second": round(images_per_second, 1),
        "host_us_per_step": round((config.batch_size / images_per_second - step_s) * 1e6, 1),
        "tflops_per_device": round(last["speed/tflops_per_device"], 4),
        "utilization": round(last["speed/tflops_per_device"] / peak, 4) if peak else None,
        "profile": str(next(profile.iterdir())) if profile.is_dir() else None}))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
