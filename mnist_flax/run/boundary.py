"""The one error boundary of each entry point (main, sweep, predict), and the --config flag.

Whatever is raised, from flag parsing to the last flush, the user sees one line, `error: ...`,
and a non-zero exit: a known cause its own line; any other the exception's first line, with the
full traceback written to a file the line names. After that line the process's stderr goes to the
same file, so no background thread (TensorBoard's writer, orbax's) or exit handler can print a
traceback after it. SIGTERM, SIGHUP and Ctrl-C stops exit 143, 129 and 130, as a shell reports them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from mnist_flax import checkpoints, configs
from mnist_flax.run import config_checks, signals, startup, storage_errors

DEFAULT_CONFIG = configs.DEFAULT
_CONFIG_ERRORS = (AttributeError, KeyError, OSError, ImportError, SyntaxError, TypeError,
                  ValueError, NameError)


def describe(error: BaseException) -> str | None:
    """The curated one line of a known cause, or None."""
    if isinstance(error, configs.UserError):  # Bad input, or a run that cannot go on.
        return str(error)
    if isinstance(error, BrokenPipeError):
        return ""  # Output piped into a reader that left (`| head`): not an error to report.
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        # A write that no curated line covers (a save has its own): stdout on a full disk, say.
        where = error.filename or "writing the output"
        return (f"{where}: no space left on device (or over quota); free space and run the same "
                "command again")
    if storage_errors.is_storage_error(error):
        return storage_errors.storage_stopped_line(checkpoints.error_line(error))
    return None


@contextlib.contextmanager
def one_line_errors(workdir_hint: str | None = None,
                    interrupted_line: str = startup.INTERRUPTED_LINE) -> Iterator[None]:
    """The boundary: every exception becomes one line and an exit status (see the module); a
    Ctrl-C that stopped at once is `interrupted_line`."""
    threading.excepthook = _thread_failed
    try:
        yield
    except SystemExit:
        raise
    except signals.Preempted as e:  # The checkpoint is saved and logged; the same command resumes.
        startup.leave_quietly(None, e.exit_code)
    except KeyboardInterrupt:  # Orbax commits a checkpoint by renaming it: none is half-written.
        startup.leave_quietly(interrupted_line, signals.INTERRUPTED_EXIT_CODE)
    except BaseException as e:  # noqa: BLE001 (the boundary: nothing passes it as a traceback)
        line, log_path = describe(e), None
        if line is None:
            log_path = startup.write_traceback(e, workdir_hint)
            where = f" (full traceback in {log_path})" if log_path else ""
            line = f"{checkpoints.error_line(e)}{where}; please report it if the cause is unclear"
        startup.leave_quietly(line and f"error: {line}", 1, log_path)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A background thread's uncaught error (a TensorBoard writer on a full disk, say): one log
    line and its traceback in a file; the main thread reports what it means for the run."""
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return
    path = startup.write_traceback(args.exc_value)
    logging.getLogger("mnist_flax").warning(
        "background thread %s failed: %s (traceback in %s)",
        getattr(args.thread, "name", "?"), checkpoints.error_line(args.exc_value), path)


def _exit_bad_config(e: Exception) -> None:
    """One line for whatever loading the config file or a --config.x=y override raised (a
    traceback in an absl flags.Error's message: its last line)."""
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


def run_app(define_flags: Callable[[], None], main: Callable[[list[str]], None]) -> None:
    """An entry point's `run()`: its flags defined and parsed (which loads the config file) by
    `parse_flags`, then `main` under absl, a Ctrl-C in any of it one line."""
    with startup.one_line_startup():
        if error := startup.quoted_flags_error(sys.argv):  # Before ml_collections reads argv.
            sys.exit(f"error: {error}")
        define_flags()
        # --help lists the key flags of the module named sys.argv[0]: a console script's path,
        # under which nothing is defined (the flags belong to main's module), so name them there.
        module = sys.modules[main.__module__]
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
        if not sys.modules["__main__"].__doc__:  # The script's: absl's usage line is its doc.
            sys.modules["__main__"].__doc__ = module.__doc__
        app.run(main, flags_parser=parse_flags)


def no_extra_arguments(argv: list[str]) -> None:
    """ConfigError for words on the command line that are not flags (absl leaves them in argv,
    and its UsageError printed the whole help before saying so)."""
    if len(argv) > 1:
        raise configs.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}; every option is a "
                                  "flag (--name=value), and --help lists them")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus loading the config file and checking it against the default's fields
    (`config_checks.check_schema`), with every failure as a one-line error; --help exits 0.

    config_flags loads the file (and applies `--config.x=y`) lazily on first access, where a typo
    would otherwise surface as a traceback from inside ml_collections.
    """
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            config = flags.FLAGS.config  # Loads the file and applies the overrides now.
            if config is not None and not isinstance(config, dict | ConfigDict):
                config.keys()  # ml_collections' stand-in for a file that failed: raises its error.
            config_checks.check_schema(config)
    except SystemExit as e:  # absl's --help prints the help, then exits 1.
        sys.exit(0 if {"--help", "-h", "--helpfull", "-?"} & set(argv) else e.code)
    except flags.Error as e:  # A config file that raised is a traceback in the message.
        if len(lines := str(e).strip().splitlines()) < 2:
            sys.exit(f"error: {lines[0].strip()}")
        _exit_bad_config(e)
    except configs.ConfigError as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # noqa: BLE001 (whatever the user's get_config raised)
        _exit_bad_config(e)
    return rest
