"""What a gs:// workdir costs, against the GCS emulator (tests/gcs_emulator.py) on this machine.

    python benchmarks/gcs_workdir.py [--saves=5] [--epochs=3] [--checkpoint_every_steps=10]

1. Seconds per checkpoint save of the default model's train state (params + Adam moments,
   ~14 MB), `checkpoints.save` into a local workdir and into gs://, `--saves` times each.
2. The same `python -m mnist_flax.main` run (default config on the packaged sample), once with a
   local workdir and once with gs://, interleaved: training images/s of the last epoch (the
   progress line; saves excluded) and wall seconds of the whole run (saves, events, lease and
   start-up included). The last line printed is one JSON object with both ratios gs/local.

The emulator is a single-threaded Python server on loopback: it measures the client-side work
and round trips, not GCS's bandwidth or latency from a TPU VM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import gcs_emulator  # noqa: E402


def time_saves(workdir: str, saves: int) -> list[float]:
    import jax

    from mnist_flax import checkpoints, configs, train

    config = configs.load()
    state = train.create_train_state(config, jax.random.key(0), 31)
    manager = checkpoints.create_manager(workdir, config.checkpoint_keep)
    seconds = []
    for step in range(1, saves + 1):
        position = checkpoints.data_position(step, 31, config, 4000)
        start = time.perf_counter()
        checkpoints.save(manager, state.replace(step=step), position)
        seconds.append(time.perf_counter() - start)
    manager.close()
    return seconds


def run_main(workdir: str, epochs: int, every: int, env: dict) -> tuple[float, float]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax.main", f"--workdir={workdir}",
         "--config.data_source=sample", f"--config.num_epochs={epochs}",
         f"--config.checkpoint_every_steps={every}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    rates = re.findall(r"done: .* \| (\d+) images/s", result.stderr)
    return float(rates[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint_every_steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        emulator = gcs_emulator.start(os.path.join(tmp, "emulator.log"))
        try:
            os.environ.update(emulator.env)
            bucket = f"gs://{emulator.bucket}/bench-{uuid.uuid4().hex[:8]}"
            local_saves = time_saves(os.path.join(tmp, "saves"), args.saves)
            gcs_saves = time_saves(f"{bucket}/saves", args.saves)
            print(f"save, local: {statistics.median(local_saves):.2f} s (median of "
                  f"{args.saves}: {', '.join(f'{s:.2f}' for s in local_saves)})")
            print(f"save, gs://: {statistics.median(gcs_saves):.2f} s (median of "
                  f"{args.saves}: {', '.join(f'{s:.2f}' for s in gcs_saves)})")
            local = run_main(os.path.join(tmp, "run"), args.epochs, args.checkpoint_every_steps,
                             emulator.env)
            gcs = run_main(f"{bucket}/run", args.epochs, args.checkpoint_every_steps,
                           emulator.env)
        finally:
            emulator.stop()
    print(f"main, local: {local[0]:.0f} images/s (last epoch), {local[1]:.1f} s wall")
    print(f"main, gs://: {gcs[0]:.0f} images/s (last epoch), {gcs[1]:.1f} s wall")
    print(json.dumps({
        "save_seconds_local": statistics.median(local_saves),
        "save_seconds_gcs": statistics.median(gcs_saves),
        "images_per_second_local": local[0], "images_per_second_gcs": gcs[0],
        "images_per_second_ratio_gcs_vs_local": gcs[0] / local[0],
        "wall_seconds_local": local[1], "wall_seconds_gcs": gcs[1],
        "wall_ratio_gcs_vs_local": gcs[1] / local[1]}))


if __name__ == "__main__":
    main()
