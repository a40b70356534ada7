"""`python -m mnist_flax.main` as one host of a pod slice, on CPU: used by test_pod.py.

    python tests/pod_worker.py --devices=2 --num_processes=2 --process_id=0 --port=P \\
        -- --workdir=gs://BUCKET/run --lease_seconds=5 --config.num_epochs=3 ...

On a TPU VM, `--multihost` makes main call `jax.distributed.initialize()`, which finds the other
hosts from the TPU metadata; here this script starts JAX's distributed runtime over loopback
instead (gloo for the CPU collectives), then runs main's own `main` with the arguments after --.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
args, main_args = parser.parse_known_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402

if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

from absl import app  # noqa: E402

from mnist_flax import main  # noqa: E402
from mnist_flax.run import boundary  # noqa: E402

main.define_flags()
app.run(main.main, argv=[sys.argv[0], *(a for a in main_args if a != "--")],
        flags_parser=boundary.parse_flags)
