"""Checks a config once, up front, so a bad field or value fails in one line before any work.

`check_schema` holds a config file to the default's fields, names and types, exactly as
ml_collections holds `--config.x=y` overrides; `validate` then checks each value's range. A bad
value is a `FieldError` (field, value, rule), so a reader of a stored config (workdir.read_config)
names its file where the command line names `--config.x`.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from mnist_flax import configs, input_pipeline, models, paths
from mnist_flax.configs import ConfigError

ADAM_EPS_PLACEMENTS = ("optax", "keras")  # Where Adam's epsilon goes: train.create_optimizer.
COMPUTE_DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine", "one_cycle")


class FieldError(ConfigError):
    """One field's value breaks a rule; the message is `--config.FIELD=VALUE: RULE`."""

    def __init__(self, field: str, value, rule: str):
        super().__init__(f"--config.{field}={value!r}: {rule}")
        self.field, self.value, self.rule = field, value, rule


class UnknownFieldError(ConfigError):
    """A config sets a field the default's does not have; `close` is the nearest field, if any
    (so a reader of a stored config can say it in its own words)."""

    def __init__(self, field: str, close: str | None):
        new = (f"declare it with its default in {configs.DEFAULT} (config files only override "
               "fields) and read it where it is used, e.g. models.create_model")
        hint = f'did you mean "{close}"? To add it, {new}' if close else f"to add it, {new}"
        super().__init__(f"--config: the config file sets {field!r}, which is not a field of the "
                         f"config; {hint}")
        self.field, self.close = field, close


def _type_name(value) -> str:
    """'float', or for a sequence its elements' types too: 'tuple of float, str'."""
    name = type(value).__name__
    if isinstance(value, tuple | list) and value:
        name += " of " + ", ".join(sorted({type(v).__name__ for v in value}))
    return name


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _fits(value, reference) -> bool:
    """Whether `value` has the type of the default's `reference` (an int where a float goes)."""
    if isinstance(reference, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(reference, bool)
    if isinstance(reference, float):
        return isinstance(value, int | float)
    if isinstance(reference, tuple | list):
        return isinstance(value, tuple | list) and all(
            _fits(v, reference[0]) for v in value) if reference else isinstance(value, tuple | list)
    return isinstance(value, type(reference))


def check_schema(config) -> None:
    """Raises ConfigError unless `config` has exactly the default config's fields, each of its
    type (nested values too): a typo'd field in a config file fails as it does on the command line.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: get_config() returned {_type_name(config)}, not an "
                          "ml_collections.ConfigDict; start from the default's, e.g. "
                          "`config = default.get_config()` (see experiments/fast.py)")
    reference = configs.load()
    for name in sorted(set(config) - set(reference)):
        close = difflib.get_close_matches(name, list(reference), 1)
        raise UnknownFieldError(name, close[0] if close else None)
    for name in sorted(set(reference) - set(config)):
        raise ConfigError(f"--config: the config file has no field {name!r}; start from the "
                          "default's fields (`config = default.get_config()`), then change some")
    for name in sorted(reference):
        if not _fits(config[name], reference[name]):
            raise FieldError(name, config[name], f"must be {_a(_type_name(reference[name]))} "
                             f"like the default's {reference[name]!r}, not "
                             f"{_a(_type_name(config[name]))}")


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise FieldError(name, value, rule)


def validate(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Raises ConfigError on the first field or value that cannot work; paths are parsed in place
    (`~` expanded), so what runs and what config.json records is the path used."""
    check_schema(config)
    for name, valid in (("data_source", input_pipeline.SOURCES), ("lr_schedule", LR_SCHEDULES),
                          ("adam_eps_placement", ADAM_EPS_PLACEMENTS),
                          ("kernel_init", models.KERNEL_INITS), ("compute_dtype", COMPUTE_DTYPES)):
        _require(config[name] in valid, name, config[name], f"must be one of {', '.join(valid)}")
    for name in ("num_epochs", "batch_size", "dense_features", "num_classes", "log_every_steps",
                 "eval_batch_size", "checkpoint_keep"):
        _require(config[name] > 0, name, config[name], "must be a positive integer")
    for name, zero in (("checkpoint_every_steps", "only at the end of each epoch"),  # check_schema
                       ("steps_per_dispatch", "1 on CPU, 16 on GPU/TPU"),  # made them ints.
                       ("profile_steps", "no profile")):
        _require(config[name] >= 0, name, config[name], f"must be an integer >= 0 (0 = {zero})")
    for name, schemes in (("data_dir", ()), ("tfds_data_dir", paths.URL_SCHEMES),
                          ("compilation_cache_dir", paths.URL_SCHEMES)):  # The IDX reader: local.
        try:
            config[name] = paths.parse(config[name], f"--config.{name}", schemes)
        except paths.PathError as e:
            raise FieldError(name, config[name], e.rule) from None
    _require(0 <= config.seed < 2**63, "seed", config.seed,
             "must be an integer in [0, 2**63)")
    for name, fix in (("learning_rate", ""), ("adam_eps", ", e.g. 1e-7 (at 0, Adam divides 0 by 0 "
                                                           "wherever a gradient is 0: NaN)")):
        _require(math.isfinite(config[name]) and config[name] > 0, name, config[name],
                 f"must be a finite number > 0{fix}")
    features = tuple(config.conv_features)
    _require(1 <= len(features) <= 6 and all(f > 0 for f in features),
             "conv_features", features, "must be 1 to 6 positive integers (one 3x3 convolution "
             "each), e.g. (32,64)")
    rates = tuple(config.dropout_rates)
    _require(len(rates) == 2 and all(0.0 <= r < 1.0 for r in rates),  # Numbers: check_schema.
             "dropout_rates", rates, "must be two rates in [0, 1), e.g. (0.25,0.5)")
    _require(config.num_classes >= 2, "num_classes", config.num_classes, "must be >= 2")
    _require(0 <= config.warmup_epochs < config.num_epochs
             and (config.warmup_epochs > 0 or config.lr_schedule != "one_cycle"),
             "warmup_epochs", config.warmup_epochs,
             f"must be in [0, num_epochs={config.num_epochs}) (and > 0 for one_cycle)")
    for name, limit in (("label_smoothing", 1.0), ("augment_max_shift", 14.0),
                        ("augment_max_rotation", 180.0), ("augment_max_scale", 1.0)):
        _require(0.0 <= config[name] < limit, name, config[name], f"must be in [0, {limit:g})")
    for name in ("batch_size", "eval_batch_size"):  # Not a FieldError: the devices are at fault.
        if config[name] % device_count:
            raise ConfigError(f"--config.{name}={config[name]} does not divide over the "
                              f"{device_count} devices; use a multiple of {device_count}")
