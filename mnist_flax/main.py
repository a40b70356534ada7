"""Trains the MNIST CNN: `python -m mnist_flax.main --workdir=runs/ [--config=...] [--config.x=y]`.

Flags -> config -> `train.train_and_evaluate(config, workdir)`. Everything else lives in importable
modules, so this file only parses, checks and reports.
"""

from __future__ import annotations

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mnist_flax import checkpoints, config_checks, input_pipeline, train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for TensorBoard events and checkpoints.")



def _exit_bad_config(e: Exception) -> None:
    """One line for whatever loading the config file or a --config.x=y override raised."""
    message = str(e)
    if isinstance(e, (AttributeError, KeyError)) and "get_config" not in message:
        field = re.search(r"'([\w.]+)", message)
        suggestion = re.search(r'Did you mean "([\w.]+)"', message)
        hint = (f'did you mean "{suggestion.group(1)}"?' if suggestion
                else f"the fields are listed in {_DEFAULT_CONFIG}")
        sys.exit(f"error: --config.{field.group(1) if field else message}: no such field in the "
                 f"config; {hint}")
    reason = [line.strip() for line in message.splitlines() if line.strip()][-1:]
    sys.exit(f"error: --config: cannot load the config file ({' '.join(reason)}); pass a Python "
             "file that defines get_config(), e.g. --config=experiments/default.py")


_CONFIG_ERRORS = (AttributeError, KeyError, OSError, ImportError, SyntaxError, TypeError)
try:  # ml_collections already reads the --config.x=y overrides here, at definition time.
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file.",
                                    lock_config=True)
except _CONFIG_ERRORS as e:
    _exit_bad_config(e)
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (every host of a TPU pod slice runs "
                  "the same command).")
flags.mark_flags_as_required(["workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus loading the config file, with every failure as a one-line error.

    config_flags loads the file (and applies `--config.x=y`) lazily on first access, where a typo
    would otherwise surface as a traceback from inside ml_collections.
    """
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # Loads the file and applies the overrides now.
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except _CONFIG_ERRORS as e:
        _exit_bad_config(e)
    return rest


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
    except (config_checks.ConfigError, input_pipeline.DataError, checkpoints.CheckpointError,
            train.TrainingDivergedError) as e:
        sys.exit(f"error: {e}")
    except checkpoints.Preempted:  # SIGTERM: the checkpoint is saved; the same command resumes.
        sys.exit(checkpoints.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
