"""Command-line plumbing shared by main and sweep: the --config flag, process setup, and
one-line errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator

import jax
from absl import flags
from ml_collections import config_flags

from mnist_flax import checkpoints, config_checks, configs, input_pipeline, ops, train, workdir

DEFAULT_CONFIG = configs.DEFAULT
_CONFIG_ERRORS = (AttributeError, KeyError, OSError, ImportError, SyntaxError, TypeError)
# Bad input, or a run that cannot go on: printed as one line, no traceback.
USER_ERRORS = (config_checks.ConfigError, input_pipeline.DataError, checkpoints.CheckpointError,
               workdir.WorkdirError, train.TrainingDivergedError)


class _DropBackendProbeFailures(logging.Filter):
    """JAX tries every platform plugin it finds and logs, at INFO, each that is absent ("Unable to
    initialize backend 'tpu': ... libtpu.so" on every CPU run). A platform that is there but
    fails still raises or warns: only these INFO records go."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO
                    and str(record.msg).startswith("Unable to initialize backend"))


_DROP_BACKEND_PROBE_FAILURES = _DropBackendProbeFailures()


def setup_process() -> None:
    """What a training process needs before JAX runs anything: called first thing by main/sweep."""
    probe_logger = logging.getLogger("jax._src.xla_bridge")
    if _DROP_BACKEND_PROBE_FAILURES not in probe_logger.filters:
        probe_logger.addFilter(_DROP_BACKEND_PROBE_FAILURES)
    ops.tune_host_allocator()
    ops.log_compiler_options()
    checkpoints.quiet_orbax_logging()
    workdir.quiet_storage_logging()


def enable_compilation_cache(cache_dir: str) -> str:
    """Turns on JAX's persistent compilation cache in `cache_dir` (config.compilation_cache_dir):
    'auto' is $JAX_COMPILATION_CACHE_DIR, else ~/.cache/mnist_flax/jax; '' turns it off. Returns
    the directory ('' when off). Every jit is cached, however fast it compiled, so a second run of
    a config recompiles nothing (`train` logs the step's hit)."""
    if cache_dir == "auto":
        cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "~/.cache/mnist_flax/jax"
    if cache_dir and not cache_dir.startswith("gs://"):
        cache_dir = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir or None)
    jax.config.update("jax_enable_compilation_cache", bool(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """USER_ERRORS become `error: ...` and exit 1; a SIGTERM or Ctrl-C stop exits 143 or 130
    (checkpoint saved); a Ctrl-C that could not wait (a second one) is one line and exits 130."""
    try:
        yield
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except workdir.Preempted as e:  # The checkpoint is saved and logged; the same command resumes.
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Orbax commits a checkpoint by renaming it: none is half-written.
        print("Interrupted (Ctrl-C): stopped at once without saving; the checkpoints already in "
              "the workdir are intact. Run the same command to resume.", file=sys.stderr)
        # A save cut short leaves orbax's helper threads behind; at interpreter shutdown they
        # would log errors after this line. Leave now, as a kill would, with the buffers flushed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(workdir.INTERRUPTED_EXIT_CODE)
    except Exception as e:
        if not workdir.is_storage_error(e):
            raise
        sys.exit(f"error: {workdir.storage_stopped_line(workdir.error_line(e))}")


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
             "file that defines get_config(), e.g. --config=experiments/best.py")


def define_config_flag(default: str | None) -> None:
    """`--config` as a locked ml_collections config file, so a mistyped `--config.x` fails."""
    try:  # ml_collections already reads the --config.x=y overrides here, at definition time.
        config_flags.DEFINE_config_file(
            "config", default, "Config file (a Python file with get_config()); default: the "
            "tutorial recipe. Override any field with --config.NAME=VALUE.", lock_config=True)
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
