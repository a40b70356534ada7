"""Trains the MNIST CNN: `python -m mnist_flax.main --workdir=runs/ [--config=...] [--config.x=y]`.

Flags -> config -> `train.train_and_evaluate(config, workdir)`. Everything else lives in importable
modules, so this file only parses, checks and reports.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mnist_flax import cli, config_checks, train, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for TensorBoard events and "
                        "checkpoints; the same command resumes a run in it.")
    cli.define_config_flag(cli.DEFAULT_CONFIG)
    flags.declare_key_flag("config")  # So that --help lists it.
    flags.DEFINE_bool("multihost", False,
                      "Call jax.distributed.initialize() first (every host of a TPU pod slice runs "
                      "the same command).")
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_process()
    if FLAGS.multihost:
        jax.distributed.initialize()
    config = FLAGS.config
    with cli.one_line_errors():
        config_checks.validate(config, jax.device_count())
        cli.enable_compilation_cache(config.compilation_cache_dir)
        workdir.prepare(FLAGS.workdir)
        logging.info("JAX %s, backend %s: %d process(es), %d device(s): %s", jax.__version__,
                     jax.default_backend(), jax.process_count(), jax.device_count(),
                     jax.devices())
        logging.info("Config (%s):\n%s", config_flags.get_config_filename(FLAGS["config"]),
                     config)
        train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
