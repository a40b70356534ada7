"""Trains the MNIST CNN: `python -m mnist_flax.main --workdir=runs/ [--config=...] [--config.x=y]`.

Flags -> config -> `train.train_and_evaluate(config, workdir)`. Everything else lives in importable
modules, so this file only parses, checks and reports.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from mnist_flax import checkpoints, config_checks, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for TensorBoard events and checkpoints.")
config_checks.define_config_flag(config_checks.DEFAULT_CONFIG)
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (every host of a TPU pod slice runs "
                  "the same command).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.multihost:
        jax.distributed.initialize()
    config = FLAGS.config
    try:
        config_checks.validate(config, jax.device_count())
        config_checks.prepare_workdir(FLAGS.workdir)
    except config_checks.ConfigError as e:
        sys.exit(f"error: {e}")
    logging.info("JAX %s, backend %s: %d process(es), %d device(s): %s", jax.__version__,
                 jax.default_backend(), jax.process_count(), jax.device_count(), jax.devices())
    logging.info("Config:\n%s", config)
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except train.USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except checkpoints.Preempted:  # SIGTERM: the checkpoint is saved; the same command resumes.
        sys.exit(checkpoints.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
