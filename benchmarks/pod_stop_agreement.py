"""What the pod's stop agreement costs: steps/s of a 2-process pod on this machine with
- `pipelined`: main's agreement (an all-reduce on the devices, read one dispatch later);
- `blocking`: the agreement before it (an all-gather the host waits for at every dispatch);
- `none`: each process reads only its own stop flag (which a real pod must not do: a signal to
  one host would leave the other waiting in the save's collectives).

    python benchmarks/pod_stop_agreement.py [--rounds=2] [--epochs=3] [--model=tiny]

Two `python -m mnist_flax.main --multihost --coordinator_address=... --num_processes=2
--process_id=N` processes, 1 CPU device each, on a local workdir both see, on the packaged
sample. `--model=tiny` (4 and 8 filters, 16 units, batch 32) makes a step take milliseconds, as on
a TPU, where a per-dispatch wait shows; `default` is the recipe. Variants alternate within each
round; the steps/s is process 0's last epoch (its progress line). The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# main, with the agreement BENCH_AGREEMENT names.
_MAIN = """
import os
from absl import app
from mnist_flax import main
from mnist_flax.run import boundary, lock, signals

variant = os.environ["BENCH_AGREEMENT"]
if variant == "none":
    signals.StopFlag.agreed = signals.StopFlag.is_set
elif variant == "blocking":
    signals.StopFlag.agreed = lambda self: not lock.on_every_process(not self.is_set())
main.define_flags()
app.run(main.main, flags_parser=boundary.parse_flags)
"""
VARIANTS = ("pipelined", "blocking", "none")
MODELS = {"default": [], "tiny": ["--config.conv_features=(4,8)", "--config.dense_features=16"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pod(workdir: str, epochs: int, variant: str, model: str) -> float:
    """Process 0's last-epoch steps/s."""
    port, batch_size = _port(), 32 if model == "tiny" else 128
    devices = "--xla_force_host_platform_device_count=1"  # Added to the caller's XLA_FLAGS.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MNIST_DATA_DIR": "",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {devices}", "BENCH_AGREEMENT": variant}
    procs = [subprocess.Popen(
        [sys.executable, "-c", _MAIN, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", f"--workdir={workdir}",
         "--config.data_source=sample", f"--config.num_epochs={epochs}",
         f"--config.batch_size={batch_size}", *MODELS[model]],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    errs = [p.communicate(timeout=1800)[1] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("\n".join(err[-3000:] for err in errs))
    rates = re.findall(r"done: .* \| (\d+) images/s", errs[0])
    return float(rates[-1]) / batch_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for variant in VARIANTS:
                rate = run_pod(os.path.join(tmp, f"{variant}-{round_}"), args.epochs, variant,
                               args.model)
                rates[variant].append(rate)
                print(f"{variant}: {rate:.1f} steps/s", flush=True)
    medians = {variant: statistics.median(values) for variant, values in rates.items()}
    print(json.dumps({"model": args.model,
                      **{f"steps_per_s_{variant}": medians[variant] for variant in VARIANTS},
                      "ratio_pipelined_none": medians["pipelined"] / medians["none"],
                      "ratio_blocking_none": medians["blocking"] / medians["none"],
                      "runs": rates}))


if __name__ == "__main__":
    main()
