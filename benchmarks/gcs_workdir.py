"""What a gs:// workdir costs, against the GCS emulator (tests/gcs_emulator.py) on this machine.

    python benchmarks/gcs_workdir.py [--saves=5] [--epochs=3] [--checkpoint_every_steps=10]

1. Seconds per checkpoint save of the default model's train state (params + Adam moments,
   ~14 MB) into a local workdir and into gs://, `--saves` times each: the time `checkpoints.save`
   blocks its caller (saves are asynchronous), and the time until the save is committed.
2. The same main run (default config on the packaged sample, a checkpoint every
   `--checkpoint_every_steps`), once with a local workdir and once with gs://: the seconds the
   training loop is blocked per save, measured in the loop (the save hooks and
   `checkpoints.save`, timed around their calls), the training images/s of the last epoch (its
   progress line: the saves inside the epoch count) and the wall seconds of the whole run.
   The last line printed is one JSON object.

The emulator is a single-threaded Python server on loopback, on the same cores as training: this
measures the client's work, round trips and the contention, not GCS's bandwidth or latency from a
TPU VM.
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

# main, with the loop's two save calls timed: `before_save` (the finite check, the lease check,
# the checksum) and `checkpoints.save` (waiting for the previous save, then the copy to host).
# The steps already dispatched are waited for first, untimed: the device is busy with them, and
# the first read of their results would wait for them, save or not.
_TIMED_MAIN = """
import sys, time
import jax
from absl import app
from mnist_flax import checkpoints, main
from mnist_flax.run import boundary, operations

def timed(function, label):
    def call(*args, **kwargs):
        jax.block_until_ready(args[1:3])
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            print(f"stall {label} {time.perf_counter() - start:.6f}", file=sys.stderr, flush=True)
    return call

checkpoints.save = timed(checkpoints.save, "save")
operations.Operations.before_save = timed(operations.Operations.before_save, "before_save")
main.define_flags()
app.run(main.main, flags_parser=boundary.parse_flags)
"""


def time_saves(workdir: str, saves: int) -> tuple[list[float], list[float]]:
    """(seconds each `checkpoints.save` call blocked, seconds until each save was committed)."""
    import jax

    from mnist_flax import checkpoints, configs, train

    config = configs.load()
    state = train.create_train_state(config, jax.random.key(0), 31)
    blocked, committed = [], []
    with checkpoints.open_manager(workdir, config.checkpoint_keep) as manager:
        for step in range(1, saves + 1):
            position = checkpoints.data_position(step, 31, config, 4000)
            start = time.perf_counter()
            checkpoints.save(manager, state.replace(step=step), position)
            blocked.append(time.perf_counter() - start)
            checkpoints.finish(manager)
            committed.append(time.perf_counter() - start)
    return blocked, committed


def run_main(workdir: str, epochs: int, every: int, env: dict) -> tuple[float, float, float]:
    """(median seconds the loop was blocked per save, last epoch's images/s, wall seconds)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _TIMED_MAIN, f"--workdir={workdir}",
         "--config.data_source=sample", f"--config.num_epochs={epochs}",
         f"--config.checkpoint_every_steps={every}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    rates = re.findall(r"done: .* \| (\d+) images/s", result.stderr)
    stalls = [float(s) for s in re.findall(r"^stall (?:save|before_save) ([\d.]+)$",
                                             result.stderr, re.M)]
    # One before_save and one save per checkpoint: their sum is what the loop waits per save.
    per_save = [a + b for a, b in zip(stalls[::2], stalls[1::2], strict=True)]
    return statistics.median(per_save), float(rates[-1]), wall


def summary(name: str, seconds: list[float]) -> str:
    return (f"{name}: {statistics.median(seconds):.3f} s (median of {len(seconds)}: "
            f"{', '.join(f'{s:.3f}' for s in seconds)})")


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
            local_blocked, local_committed = time_saves(os.path.join(tmp, "saves"), args.saves)
            gcs_blocked, gcs_committed = time_saves(f"{bucket}/saves", args.saves)
            print(summary("save blocks the caller, local", local_blocked))
            print(summary("save blocks the caller, gs://", gcs_blocked))
            print(summary("save committed, local", local_committed))
            print(summary("save committed, gs://", gcs_committed))
            local = run_main(os.path.join(tmp, "run"), args.epochs, args.checkpoint_every_steps,
                             emulator.env)
            gcs = run_main(f"{bucket}/run", args.epochs, args.checkpoint_every_steps,
                           emulator.env)
        finally:
            emulator.stop()
    for name, (stall, rate, wall) in (("local", local), ("gs://", gcs)):
        print(f"main, {name}: the loop blocked {stall:.3f} s per save (median), {rate:.0f} "
              f"images/s (last epoch), {wall:.1f} s wall")
    print(json.dumps({
        "save_stall_s_local": local[0], "save_stall_s_gcs": gcs[0],
        "images_per_s_local": local[1], "images_per_s_gcs": gcs[1],
        "images_per_s_ratio_gcs_local": gcs[1] / local[1],
        "wall_s_local": local[2], "wall_s_gcs": gcs[2], "wall_ratio_gcs_local": gcs[2] / local[2],
        "save_blocks_s_local": statistics.median(local_blocked),
        "save_blocks_s_gcs": statistics.median(gcs_blocked),
        "save_committed_s_local": statistics.median(local_committed),
        "save_committed_s_gcs": statistics.median(gcs_committed)}))


if __name__ == "__main__":
    main()
