"""Config files that ship with the package, and the one way every entry point loads a config."""

import importlib.resources

import ml_collections
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
