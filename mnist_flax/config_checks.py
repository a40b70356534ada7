"""Checks a config and a workdir once, up front, so bad input fails in one line before any work."""

from __future__ import annotations

import math
import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from mnist_flax import input_pipeline, models

COMPUTE_DTYPES = ("float32", "bfloat16")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "experiments", "default.py")
_CONFIG_ERRORS = (AttributeError, KeyError, OSError, ImportError, SyntaxError, TypeError)
LR_SCHEDULES = ("constant", "cosine", "one_cycle")


class ConfigError(ValueError):
    """A bad config value or workdir; the message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(config: ml_collections.ConfigDict, name: str) -> None:
    value = config[name]
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"--config.{name}={value!r}: must be a positive integer")


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Raises ConfigError on the first value that cannot work."""
    _require(config.data_source in input_pipeline.SOURCES,
             f"--config.data_source={config.data_source!r}: must be one of "
             f"{', '.join(input_pipeline.SOURCES)}")
    for name in ("num_epochs", "batch_size", "dense_features", "num_classes", "log_every_steps",
                 "eval_batch_size", "checkpoint_keep"):
        _positive_int(config, name)
    every = config.checkpoint_every_steps
    _require(isinstance(every, int) and not isinstance(every, bool) and every >= 0,
             f"--config.checkpoint_every_steps={every!r}: must be an integer >= 0 (0 = only at "
             "the end of each epoch)")
    nan_at = config.debug_nan_at_step
    _require(isinstance(nan_at, int) and not isinstance(nan_at, bool) and nan_at >= 0,
             f"--config.debug_nan_at_step={nan_at!r}: must be an integer >= 0 (0 = off; for tests)")
    _require(isinstance(config.seed, int) and config.seed >= 0,
             f"--config.seed={config.seed!r}: must be a non-negative integer")
    for name in ("learning_rate", "adam_eps"):
        value = config[name]
        _require(math.isfinite(value) and value >= 0 and (value > 0 or name == "adam_eps"),
                 f"--config.{name}={value!r}: must be a finite number > 0")
    features = tuple(config.conv_features)
    _require(1 <= len(features) <= 6 and all(isinstance(f, int) and f > 0 for f in features),
             f"--config.conv_features={features!r}: must be 1 to 6 positive integers (one 3x3 "
             "convolution each), e.g. (32,64)")
    rates = tuple(config.dropout_rates)
    _require(len(rates) == 2 and all(0.0 <= r < 1.0 for r in rates),
             f"--config.dropout_rates={rates!r}: must be two rates in [0, 1), e.g. (0.25,0.5)")
    _require(config.num_classes >= 2, f"--config.num_classes={config.num_classes}: must be >= 2")
    _require(config.kernel_init in models.KERNEL_INITS,
             f"--config.kernel_init={config.kernel_init!r}: must be one of "
             f"{', '.join(models.KERNEL_INITS)}")
    _require(config.lr_schedule in LR_SCHEDULES,
             f"--config.lr_schedule={config.lr_schedule!r}: must be one of "
             f"{', '.join(LR_SCHEDULES)}")
    _require(0 <= config.warmup_epochs < config.num_epochs
             and (config.warmup_epochs > 0 or config.lr_schedule != "one_cycle"),
             f"--config.warmup_epochs={config.warmup_epochs!r}: must be in [0, num_epochs="
             f"{config.num_epochs}) (and > 0 for one_cycle)")
    _require(0.0 <= config.label_smoothing < 1.0,
             f"--config.label_smoothing={config.label_smoothing!r}: must be in [0, 1)")
    for name, limit in (("augment_max_shift", 14.0), ("augment_max_rotation", 180.0),
                        ("augment_max_scale", 1.0)):
        _require(0.0 <= config[name] < limit,
                 f"--config.{name}={config[name]!r}: must be in [0, {limit:g})")
    _require(config.compute_dtype in COMPUTE_DTYPES,
             f"--config.compute_dtype={config.compute_dtype!r}: must be one of "
             f"{', '.join(COMPUTE_DTYPES)}")
    for name in ("batch_size", "eval_batch_size"):
        _require(config[name] % device_count == 0,
                 f"--config.{name}={config[name]} does not divide over the {device_count} "
                 f"devices; use a multiple of {device_count}")


def check_fits_data(config: ml_collections.ConfigDict, num_train: int) -> None:
    _require(config.batch_size <= num_train,
             f"--config.batch_size={config.batch_size} is larger than the {num_train:,} training "
             "images; use a smaller batch")


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir if needed; refuses a path that is a file or cannot be written."""
    _require(bool(workdir), "--workdir is empty; pass a directory, e.g. --workdir=runs/")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: exists and is not a directory; pick another path")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror}); "
                          "pick a writable directory") from None


# ---------------------------------------------------------------------------------------------
# The --config flag of main and sweep: loading the file and its overrides, failing in one line.


def _exit_bad_config(e: Exception) -> None:
    """One line for whatever loading the config file or a --config.x=y override raised."""
    message = str(e)
    if isinstance(e, (AttributeError, KeyError)) and "get_config" not in message:
        field = re.search(r"'([\w.]+)", message)
        suggestion = re.search(r'Did you mean "([\w.]+)"', message)
        hint = (f'did you mean "{suggestion.group(1)}"?' if suggestion
                else f"the fields are listed in {DEFAULT_CONFIG}")
        sys.exit(f"error: --config.{field.group(1) if field else message}: no such field in the "
                 f"config; {hint}")
    reason = [line.strip() for line in message.splitlines() if line.strip()][-1:]
    sys.exit(f"error: --config: cannot load the config file ({' '.join(reason)}); pass a Python "
             "file that defines get_config(), e.g. --config=experiments/default.py")


def define_config_flag(default: str | None) -> None:
    """`--config` as a locked ml_collections config file, so a mistyped `--config.x` fails."""
    try:  # ml_collections already reads the --config.x=y overrides here, at definition time.
        config_flags.DEFINE_config_file("config", default, "Experiment config file.",
                                        lock_config=True)
    except _CONFIG_ERRORS as e:
        _exit_bad_config(e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus loading the config file, with every failure as a one-line error.

    config_flags loads the file (and applies `--config.x=y`) lazily on first access, where a typo
    would otherwise surface as a traceback from inside ml_collections.
    """
    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # Loads the file and applies the overrides now.
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except _CONFIG_ERRORS as e:
        _exit_bad_config(e)
    return rest
