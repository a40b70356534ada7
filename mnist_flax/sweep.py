"""Runs one config over a grid of values, each run its own TensorBoard run under one parent dir.

    python -m mnist_flax.sweep --workdir=runs/lr --sweep=learning_rate=1e-4,3e-4,1e-3 \\
        [--sweep=seed=0,1,2] [--config=experiments/best.py] [--results=out.json]

Each value (each combination, for several --sweep flags) trains in `workdir/key=value[/...]` with
`train.train_and_evaluate`, one after the other, so `tensorboard --logdir=workdir` overlays them.
A value's `%`, `/` and `\\` are written `%25`, `%2F`, `%5C` there: one directory per value.
The summary table, and the optional JSON, give each run's final test accuracy, its wall time and the
machine, and the mean ± std over the seeds of each combination of the other swept values; the JSON
is rewritten after every run, so an interrupted sweep keeps what it measured. Every value is
checked, against its data too, before the first trains; a value that diverges is marked in the
table and the JSON, the others still train, and the sweep exits 3 (1 where an error stopped it).
"""

from __future__ import annotations

import itertools
import re
import shlex
import sys
import time
from typing import Any

from mnist_flax.run import startup

with startup.one_line_startup():  # Seconds of imports before the boundary exists.
    import jax
    import ml_collections
    from absl import flags, logging
    from ml_collections.config_flags import tuple_parser

    from mnist_flax import input_pipeline, paths, sweep_results, train
    from mnist_flax.configs import ConfigError, check_against_data
    from mnist_flax.progress import TrainingDivergedError
    from mnist_flax.run import boundary, config_checks, operations, process, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Parent directory; each run writes to workdir/key=value.")
    boundary.define_config_flag(boundary.DEFAULT_CONFIG)
    flags.declare_key_flag("config")
    flags.DEFINE_multi_string("sweep", None, "key=value1,value2,...; several flags sweep the grid.")
    flags.DEFINE_string("results", None, "Optional JSON file for the measured results.")
    flags.mark_flags_as_required(["workdir", "sweep"])

Assignment = tuple[tuple[str, Any, str], ...]  # ((key, value, value as typed), ...) for one run.
DATA_FIELDS = ("data_source", "data_dir", "tfds_data_dir", "verify_checksums")  # load_dataset's.
DIVERGED_EXIT_CODE = 3  # The sweep ran to its end, but some values diverged.


def split_values(text: str) -> list[str]:
    """Splits at commas outside brackets, so tuple values like (32,64),(64,128) stay whole."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current]]


# What a value of each swept type must be, in the words of its one-line error, and the parser
# that `--config.key=value` uses for a field of that type: a value is read as main reads it.
_KINDS = ((bool, "a bool (true/false)", flags.BooleanParser()),
          (int, "an integer", flags.IntegerParser()),
          (float, "a number", flags.FloatParser()),
          (tuple | list, "a tuple, e.g. (32,64)", tuple_parser.TupleParser()))


def parse_value(key: str, text: str, current: Any) -> Any:
    """`text` as `--config.key=text` reads it for the config field's type; ConfigError when it
    cannot."""
    if isinstance(current, str):
        return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text
    kind = next(((words, parser) for type_, words, parser in _KINDS
                 if isinstance(current, type_)), None)
    if kind is None:
        raise ConfigError(f"--sweep {key}: fields of type {type(current).__name__} "
                          "cannot be swept")
    words, parser = kind
    try:
        return parser.parse(text)
    except (ValueError, TypeError, SyntaxError):
        raise ConfigError(f"--sweep {key}: {text!r} is not {words}") from None


def parse_sweep(spec: str, config: ml_collections.ConfigDict) -> list[tuple[str, Any, str]]:
    """'key=v1,v2' -> [(key, v1, 'v1'), (key, v2, 'v2')], typed like the config's field."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError(f"--sweep={spec}: expected key=value1,value2,...")
    if key not in config:
        raise ConfigError(f"--sweep={spec}: the config has no field {key!r}")
    texts = split_values(values)
    if any(not t for t in texts):
        raise ConfigError(f"--sweep={spec}: empty value in the list")
    axis = [(key, parse_value(key, t, config[key]), t) for t in texts]
    for i, (_, value, text) in enumerate(axis):  # Twice would be one run counted twice in a mean.
        earlier = [t for _, v, t in axis[:i] if v == value]
        if earlier:
            same = "" if earlier[0] == text else f" (as {earlier[0]} and {text})"
            raise ConfigError(f"--sweep {key}: {text} is given twice{same}")
    return axis


def expand(specs: list[str], config: ml_collections.ConfigDict) -> list[Assignment]:
    """The grid of all --sweep flags, in the order given (the last flag varies fastest)."""
    axes = [parse_sweep(spec, config) for spec in specs]
    keys = [axis[0][0] for axis in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: a field is swept twice ({', '.join(keys)})")
    return [tuple(run) for run in itertools.product(*axes)]


def run_config(config: ml_collections.ConfigDict,
               assignment: Assignment) -> ml_collections.ConfigDict:
    run = config.copy_and_resolve_references()
    for key, value, _ in assignment:
        run[key] = value
    return run


# Written %XX in a run's name, as in URLs: a separator would nest directories and merge values
# that differ only in it (/a, /a/ and //a all named one run); % itself, so the names stay distinct.
_NOT_IN_NAMES = re.compile(r"[%/\\\x00-\x1f\x7f]")
_NAME_MAX = 255  # Bytes in one directory name, on Linux's file systems and in gcsfuse.


def run_name(assignment: Assignment) -> str:
    """'learning_rate=1e-4/seed=0': the values as typed, one directory level per swept field."""
    return "/".join(
        f"{key}={_NOT_IN_NAMES.sub(lambda m: f'%{ord(m[0]):02X}', text)}"
        for key, _, text in assignment)


def _typed(assignment: Assignment) -> str:
    return ", ".join(f"{key}={text}" for key, _, text in assignment)


def run_dirs(parent: str, grid: list[Assignment]) -> list[str]:
    """Each run's directory; ConfigError, before any training, where a name cannot be made or two
    runs would share a directory (and so one run would be reported as several)."""
    dirs: dict[str, Assignment] = {}
    for assignment in grid:
        for key, _, text in assignment:
            size = len(run_name(((key, None, text),)).encode())
            if size > _NAME_MAX:
                raise ConfigError(f"--sweep {key}: the run directory for {text} would be named in "
                                  f"{size} bytes, over the {_NAME_MAX} a file system allows; "
                                  "sweep a shorter value")
        logdir = str(workdir.path(parent) / run_name(assignment))
        if logdir in dirs:
            raise ConfigError(f"--sweep: {_typed(dirs[logdir])} and {_typed(assignment)} would "
                              f"both train in {logdir}; sweep each value once")
        dirs[logdir] = assignment
    return list(dirs)


def group_name(assignment: Assignment) -> str:
    """The run's name without its seed: the runs of a group differ only in the seed."""
    return run_name(tuple(a for a in assignment if a[0] != "seed"))


def load_checked(grid: list[Assignment],
                 configs: list[ml_collections.ConfigDict]) -> list[input_pipeline.Dataset]:
    """Each point's data, loaded once per distinct DATA_FIELDS (the fields `load_dataset` reads)
    and checked against the point: one that cannot train is refused, named, before any trains."""
    loaded: dict[tuple[Any, ...], input_pipeline.Dataset] = {}
    for assignment, cfg in zip(grid, configs, strict=True):
        key = tuple(cfg[field] for field in DATA_FIELDS)
        if key not in loaded:
            loaded[key] = input_pipeline.load_dataset(cfg)
        try:
            check_against_data(cfg, loaded[key].train_labels)
        except ConfigError as e:
            raise ConfigError(f"--sweep {_typed(assignment)}: {e}") from None
    return [loaded[tuple(cfg[field] for field in DATA_FIELDS)] for cfg in configs]


def run_sweep(config: ml_collections.ConfigDict, parent: str, specs: list[str],
              on_result=None) -> list[dict[str, Any]]:
    """Checks every run's config and data first, then trains them one after the other; a run
    that diverges is recorded as such and the next one trains."""
    grid = expand(specs, config)
    logdirs = run_dirs(parent, grid)
    configs = [run_config(config, a) for a in grid]
    for cfg in configs:
        config_checks.validate(cfg, jax.device_count())
    datasets = load_checked(grid, configs)
    process.enable_compilation_cache(config.compilation_cache_dir)  # One cache for the whole sweep.
    results = []
    for assignment, cfg, logdir, data in zip(grid, configs, logdirs, datasets, strict=True):
        workdir.prepare(logdir)
        name, metrics, error = run_name(assignment), None, None
        logging.info("Sweep run %s", name)
        start = time.perf_counter()
        try:
            with operations.held(logdir, cfg) as hooks:
                _, metrics = train.train_and_evaluate(cfg, logdir, hooks, data)
        except TrainingDivergedError as e:  # Any other error stops the sweep.
            error = str(e)
            logging.warning("Sweep run %s diverged: %s; the sweep goes on", name, error)
        run = {"name": name, "group": group_name(assignment),
               "overrides": {key: value for key, value, _ in assignment}}
        results.append(sweep_results.run_result(run, cfg, logdir, time.perf_counter() - start,
                                                metrics, error))
        if on_result:
            on_result(results)
    return results


def main(argv: list[str]) -> None:
    config = FLAGS.config
    command = "python -m mnist_flax.sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results_file = (sweep_results.ResultsFile(FLAGS.results, config, command) if FLAGS.results
                    else None)
    with boundary.one_line_errors(FLAGS.workdir):
        boundary.no_extra_arguments(argv)
        FLAGS.workdir = paths.parse(FLAGS.workdir, "--workdir")  # `~` expanded, gs:/x refused.
        if results_file:
            sweep_results.check_results(results_file.path)
        process.setup_process()
        process.start_jax()
        results = run_sweep(config, FLAGS.workdir, FLAGS.sweep,
                            results_file.write if results_file else None)
        print(sweep_results.format_table(results))
        if results_file:
            results_file.finish(FLAGS.workdir)
        if line := sweep_results.diverged_line(results):
            print(f"error: {line}", file=sys.stderr)
            sys.exit(DIVERGED_EXIT_CODE)


def run() -> None:
    """The console script and `python -m mnist_flax.sweep`."""
    boundary.run_app(define_flags, main)


if __name__ == "__main__":
    run()
