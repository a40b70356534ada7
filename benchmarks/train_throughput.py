"""Training throughput of mnist_flax against PyTorch eager and the Keras tutorial (Keras 3, JAX).

    python benchmarks/train_throughput.py [--repeats=3] [--steps=100] [--warmup=20] [--peers=...]
        [--e2e_epochs=12]

Same model (the tutorial CNN), batch 128, Adam, float32, on whatever this machine is. Every
measurement runs in its own subprocess with the same environment (threads, allocator, variables),
and the three are interleaved repeat by repeat, so a slow minute of the machine hurts all alike;
the table shows medians. The last line printed is one JSON object:
{"mnist_flax": images/s, "pytorch": ..., "keras_jax": ..., "ratio_vs_pytorch": ...}.

mnist_flax's figures: "step" feeds `train.train_step` one resident batch, warped first when
augmenting (the step alone); "epoch" runs a whole epoch through `train_and_evaluate`'s data path
(`fast.dispatch.run` on the device-resident data, `fast.steps_per_dispatch` steps per dispatch);
the data path must cost
under 5% (`epoch/step` is printed). "end-to-end" (once, after the repeats; --e2e_epochs=0 skips it)
runs `python -m mnist_flax.main` itself on full MNIST ($MNIST_DATA_DIR) for --e2e_epochs epochs
(12, the tutorial's, for the README's figure): wall seconds including start-up, compilation, the
evaluation after every epoch and the checkpoints, and images/s over that whole wall time.

Images are random uint8 in MNIST's shapes: speed does not depend on pixel values, and the
benchmark then needs no data set. Peers need the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH = 128
NUM_TRAIN = 60_000


def _fake_mnist(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def best_augmentation() -> dict[str, float]:
    """experiments/best.py's warp ranges, to add to the default config."""
    from mnist_flax import configs

    best = configs.load(os.path.join(EXPERIMENTS, "best.py"))
    return {key: best[key] for key in best if key.startswith("augment_")}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_mnist_flax(steps: int, warmup: int, epoch: bool, **overrides) -> dict:
    from mnist_flax.run import process

    process.tune_host_allocator()  # As main does, before JAX runs anything.
    import jax

    from mnist_flax import configs, fast, input_pipeline, progress, sharding, train
    from mnist_flax.fast import dispatch

    config = configs.load()
    config.update(overrides)
    images, labels = _fake_mnist(NUM_TRAIN)
    dataset = input_pipeline.Dataset(images, labels, images[:1000], labels[:1000], "synthetic")
    mesh = sharding.make_mesh()
    state = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))
    augment = jax.jit(dispatch.augment_batch)

    def step(state, batch):  # The loop's step on a resident batch, warped first if augmenting.
        if state.augmentation.enabled:
            batch = augment(state, batch)
        return train.train_step(state, batch)

    start = time.perf_counter()
    batch = sharding.shard_batch(mesh, input_pipeline.batch_at(dataset, 0, 0, BATCH))
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    result = {"images_per_s": BATCH / step_s, "ms_per_step": 1000 * step_s,
              "compile_s": compile_s}
    if epoch:  # The data path of train_and_evaluate: device data, k steps per dispatch.
        steps_per_epoch = NUM_TRAIN // BATCH
        data, k = dispatch.device_dataset(mesh, dataset), fast.steps_per_dispatch(config)
        state = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))
        kwargs = dict(batch_size=BATCH, steps_per_epoch=steps_per_epoch, mesh=mesh)
        order = dispatch.device_epoch_order(mesh, 0, 0, NUM_TRAIN)
        for n in sorted({progress.chunk_steps(s, k, steps_per_epoch, steps_per_epoch, config)
                         for s in range(0, steps_per_epoch, k)}):  # Compile every chunk size.
            state, _ = dispatch.run(train.train_step_fn, state, data, order, num_steps=n, **kwargs)
        start, step = time.perf_counter(), 0
        order = dispatch.device_epoch_order(mesh, 0, 0, NUM_TRAIN)  # Once per epoch, as the loop.
        while step < steps_per_epoch:
            n = progress.chunk_steps(step, k, steps_per_epoch, steps_per_epoch, config)
            state, metrics = dispatch.run(train.train_step_fn, state, data, order, num_steps=n,
                                          **kwargs)
            step += n
        jax.block_until_ready(metrics)
        result["epoch_images_per_s"] = steps_per_epoch * BATCH / (time.perf_counter() - start)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def end_to_end(epochs: int) -> dict | None:
    """`python -m mnist_flax.main` on full MNIST for `epochs` epochs: wall time and images/s."""
    import tempfile

    data_dir = os.environ.get("MNIST_DATA_DIR", "")
    if not data_dir:
        print("  end-to-end: skipped (set $MNIST_DATA_DIR to the full MNIST IDX files)",
              file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "mnist_flax.main", f"--workdir={workdir}",
                   f"--config.data_dir={data_dir}", f"--config.num_epochs={epochs}"]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  end-to-end: failed ({last})", file=sys.stderr)
        return None
    images = epochs * (NUM_TRAIN // BATCH) * BATCH
    return {"epochs": epochs, "wall_s": seconds, "images_per_s": images / seconds,
            "test_accuracy": float(result.stdout.strip().splitlines()[-1].split()[-1])}


def worker_mnist_flax_bf16(steps: int, warmup: int, epoch: bool) -> dict:
    """The same, with --config.compute_dtype=bfloat16 (convolutions and matmuls in bf16)."""
    return worker_mnist_flax(steps, warmup, epoch=False, compute_dtype="bfloat16")


def worker_mnist_flax_augmented(steps: int, warmup: int, epoch: bool) -> dict:
    """The same, with experiments/best.py's random affine warp of every training image."""
    return worker_mnist_flax(steps, warmup, epoch=False, **best_augmentation())


def worker_matmul(steps: int, warmup: int, epoch: bool) -> dict:
    """The machine's float32 roofline: a jitted 2048x2048 matmul, in GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    for _ in range(3):
        matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(20):
        out = matmul(a)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / 20
    return {"gflops": 2 * 2048**3 / seconds / 1e9, "not_preloaded": not_preloaded()}


def not_preloaded() -> list[str]:
    """The LD_PRELOAD libraries this process did not load: ld.so skips a missing one with a
    warning, and the run would be labelled with an environment it did not have."""
    if not os.path.exists("/proc/self/maps"):
        return []
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "/" in line}
    names = {os.path.basename(path) for path in mapped}

    def loaded(lib: str) -> bool:  # By its real path, or a bare soname by its versioned file.
        return os.path.realpath(lib) in mapped or any(n.startswith(os.path.basename(lib))
                                                     for n in names)

    wanted = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    return [lib for lib in wanted if not loaded(lib)]


def worker_pytorch(steps: int, warmup: int, epoch: bool) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(  # The tutorial CNN, NCHW.
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    images, labels = _fake_mnist(BATCH)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels).long()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    return {"images_per_s": BATCH / step_s, "ms_per_step": 1000 * step_s, "compile_s": compile_s,
            "threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb()}


def worker_keras_jax(steps: int, warmup: int, epoch: bool) -> dict:
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential([  # The tutorial's code, as written there.
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adam(),
                  metrics=["accuracy"])
    images, labels = _fake_mnist(BATCH * (warmup + steps))
    x = images.astype("float32") / 255

    start = time.perf_counter()
    model.fit(x[:BATCH], labels[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
    compile_s = time.perf_counter() - start
    model.fit(x[:BATCH * warmup], labels[:BATCH * warmup], batch_size=BATCH, epochs=1,
              verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(x[BATCH * warmup:], labels[BATCH * warmup:], batch_size=BATCH, epochs=1,
              verbose=0, shuffle=False)
    step_s = (time.perf_counter() - start) / steps
    return {"images_per_s": BATCH / step_s, "ms_per_step": 1000 * step_s, "compile_s": compile_s,
            "peak_rss_mb": _peak_rss_mb()}


WORKERS = {"mnist_flax": worker_mnist_flax, "mnist_flax_bf16": worker_mnist_flax_bf16,
           "mnist_flax_augmented": worker_mnist_flax_augmented,
           "pytorch": worker_pytorch, "keras_jax": worker_keras_jax}


def run_worker(name: str, args) -> dict | None:
    command = [sys.executable, os.path.abspath(__file__), f"--worker={name}",
               f"--steps={args.steps}", f"--warmup={args.warmup}"]
    if not args.epoch:
        command.append("--no-epoch")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {name}: failed ({last})", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing")
    parser.add_argument("--peers", default="mnist_flax,mnist_flax_bf16,pytorch,keras_jax")
    parser.add_argument("--no-epoch", dest="epoch", action="store_false",
                        help="skip the whole-epoch timing of mnist_flax's data path")
    parser.add_argument("--e2e_epochs", type=int, default=12,
                        help="epochs of the end-to-end run of main on full MNIST (0 = skip); "
                        "the README's figure uses 12, the tutorial's")
    parser.add_argument("--worker", choices=sorted([*WORKERS, "matmul"]), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = worker_matmul if args.worker == "matmul" else WORKERS[args.worker]
        print(json.dumps(worker(args.steps, args.warmup, args.epoch)))
        return
    names = [n for n in args.peers.split(",") if n]
    unknown = set(names) - set(WORKERS)
    if unknown:
        sys.exit(f"error: --peers: unknown {', '.join(sorted(unknown))}; "
                 f"choose from {', '.join(WORKERS)}")

    env_keys = ("LD_PRELOAD", "GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS")
    env = ", ".join(f"{k}={os.environ[k]}" for k in env_keys if k in os.environ)
    print(f"cpus: {os.cpu_count()}, environment: {env or 'default'}", file=sys.stderr)
    roofline = run_worker("matmul", args)
    if roofline and roofline.get("not_preloaded"):
        sys.exit(f"error: LD_PRELOAD: {', '.join(roofline['not_preloaded'])} did not load in the "
                 "workers (missing or not a library); install it or fix the path, e.g. Debian's "
                 "libgoogle-perftools4 for /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")
    if roofline:
        gflops = roofline["gflops"]
        print(f"jitted 2048^2 float32 matmul: {gflops:.0f} GFLOP/s, so ~{gflops * 1e3 / 72:.0f} "
              "images/s at 72 MFLOP per training image", file=sys.stderr)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:
            result = run_worker(name, args)
            if result:
                runs[name].append(result)
                print(f"  repeat {repeat + 1} {name}: {result['images_per_s']:.0f} images/s",
                      file=sys.stderr)

    failed = [name for name in names if not runs[name]]
    if failed:
        sys.exit(f"error: no successful measurement of {', '.join(failed)} (see above)")

    def median(name, key):
        values = [r[key] for r in runs[name] if key in r]
        return statistics.median(values) if values else float("nan")

    print(f"\n{'':20} {'images/s':>9} {'ms/step':>8} {'compile s':>10} {'peak RSS MB':>12}")
    for name in names:
        print(f"{name:20} {median(name, 'images_per_s'):9.0f} {median(name, 'ms_per_step'):8.1f}"
              f" {median(name, 'compile_s'):10.2f} {median(name, 'peak_rss_mb'):12.0f}")
    summary = {name: round(median(name, "images_per_s"), 1) for name in names}
    if roofline:
        summary["matmul_gflops"] = round(roofline["gflops"], 1)
    if "mnist_flax" in names and args.epoch:
        epoch = median("mnist_flax", "epoch_images_per_s")
        summary["mnist_flax_epoch"] = round(epoch, 1)
        print(f"mnist_flax whole epoch through main's data path: {epoch:.0f} images/s "
              f"(epoch/step = {epoch / summary['mnist_flax']:.3f})")
    e2e = end_to_end(args.e2e_epochs) if args.e2e_epochs and "mnist_flax" in names else None
    if e2e:
        summary["mnist_flax_end_to_end"] = round(e2e["images_per_s"], 1)
        summary["end_to_end_wall_s"] = round(e2e["wall_s"], 1)
        print(f"mnist_flax end to end (python -m mnist_flax.main, {e2e['epochs']} epochs + "
              f"{e2e['epochs']} evaluations, full MNIST): {e2e['wall_s']:.1f} s wall, "
              f"{e2e['images_per_s']:.0f} images/s over the whole run (end-to-end/step = "
              f"{e2e['images_per_s'] / summary['mnist_flax']:.3f}), test accuracy "
              f"{e2e['test_accuracy']:.4f}")
    if "mnist_flax" in names and "pytorch" in names:
        summary["ratio_vs_pytorch"] = round(summary["mnist_flax"] / summary["pytorch"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
