"""Config files that ship with the package, and the one way every entry point loads a config."""

import importlib.resources

import ml_collections
import numpy as np
from ml_collections.config_flags import config_flags

DEFAULT = str(importlib.resources.files(__name__) / "default.py")  # The Keras tutorial's recipe.


class UserError(ValueError):
    """Bad input, or a run that cannot go on: its message is the one line the user sees (each
    entry point's boundary prints it, no traceback). Every such error derives from this."""


class ConfigError(UserError):
    """A config value that cannot work; the message names the field and the fix."""


def load(path: str = DEFAULT) -> ml_collections.ConfigDict:
    """The config of a file with `get_config()`, loaded (and locked) exactly as `--config` does."""
    return config_flags.ConfigFileFlagParser(name="config").parse(path)


def check_against_data(config: ml_collections.ConfigDict, train_labels: np.ndarray) -> None:
    """The checks that need the training labels (sizes, classes, steps): ConfigError before
    anything compiles or is written; `sweep` runs them for every grid point before the first."""
    num_train, top_label = len(train_labels), int(train_labels.max())
    if config.batch_size > num_train:
        raise ConfigError(f"--config.batch_size={config.batch_size} is larger than the "
                          f"{num_train:,} training images; use a smaller batch")
    if top_label >= config.num_classes:
        raise ConfigError(f"--config.num_classes={config.num_classes} but the data has label "
                          f"{top_label}; use --config.num_classes={top_label + 1} or more")
    steps_per_epoch = num_train // config.batch_size
    total = steps_per_epoch * config.num_epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule != "constant" and warmup >= total:
        raise ConfigError(
            f"--config.warmup_epochs={config.warmup_epochs} is {warmup} steps, not fewer than the "
            f"run's {total} ({config.num_epochs} epochs of {steps_per_epoch}): the "
            f"{config.lr_schedule} schedule would never decay; use a smaller warmup_epochs")
