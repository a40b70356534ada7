"""Errors before an entry point's error boundary exists (seconds of importing jax, orbax and
TensorFlow Datasets): one line, not Python's traceback. A Ctrl-C is its line and exit status 130;
any other error (JAX refusing a JAX_* variable at import, a broken install) is `error: ...`
naming its traceback file, and exit status 1. Only the standard library, so an entry module
imports this first and wraps its imports in `one_line_startup`; a notebook importing
`mnist_flax.predict` still gets the exception as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from types import TracebackType

# What a shell reports for a process Ctrl-C ended (run.signals uses this one too).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
INTERRUPTED_LINE = ("Interrupted (Ctrl-C): stopped at once without saving; the checkpoints "
                    "already in the workdir are intact. Run the same command to resume.")
PREDICT_INTERRUPTED_LINE = "Interrupted (Ctrl-C): stopped; predict writes nothing to the workdir."


@contextlib.contextmanager
def one_line_startup(line: str = INTERRUPTED_LINE) -> Iterator[None]:
    """Around an entry module's imports and start-up: a Ctrl-C in them that nothing catches
    prints `line` and exits 130, and an error raised in them that nothing catches is one line
    (through `sys.excepthook`, which Python calls only for an exception no caller handled)."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as e:
        if not isinstance(sys.excepthook, _OneLineStartup):
            sys.excepthook = _OneLineStartup(sys.excepthook, line)
        sys.excepthook.errors.append(e)
        raise


class _OneLineStartup:
    """sys.excepthook: an uncaught KeyboardInterrupt is `line` and exit 130, an error that left
    a `one_line_startup` block is `startup_error_line` and exit 1; any other exception goes to
    the previous hook."""

    def __init__(self, previous, line: str):
        self.previous, self.line = previous, line
        self.errors: list[BaseException] = []

    def __call__(self, kind: type[BaseException], error: BaseException,
                 tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            leave_quietly(self.line, INTERRUPTED_EXIT_CODE)
        elif any(error is e for e in self.errors):
            leave_quietly(startup_error_line(error), 1)
        else:
            self.previous(kind, error, tb)


def startup_error_line(error: BaseException) -> str:
    """`error: Type: message (...; full traceback in FILE); ` and what to fix: the environment
    variable whose value the message quotes, if one does, else where to look."""
    message = (str(error).strip().splitlines() or [""])[0][:200]
    path = write_traceback(error)
    where = f"; full traceback in {path}" if path else ""
    quoted = [f"{name}={value}" for name, value in sorted(os.environ.items())
              if value and (f'"{value}"' in message or f"'{value}'" in message)]
    fix = (f"fix or unset {quoted[0]}" if quoted else "an environment variable (JAX_*, XLA_FLAGS) "
           "or the installation (pip install -e .) may be at fault")
    return f"error: {type(error).__name__}: {message} (while starting{where}); {fix}"


def write_traceback(error: BaseException, workdir: str | None = None) -> str:
    """Writes `error`'s traceback into <workdir>/errors/ (a local workdir, if it can be written)
    or a temporary file; returns its path, or '' when it could not be written."""
    name = f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    directory = os.path.join(workdir, "errors") if workdir and "://" not in workdir else None
    try:
        if directory and os.path.isdir(workdir):
            with contextlib.suppress(OSError):
                os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name) if directory and os.access(directory, os.W_OK) \
            else None
        if path is None:
            fd, path = tempfile.mkstemp(prefix="mnist_flax-traceback-", suffix=".txt")
            os.close(fd)
        with open(path, "w") as f:
            traceback.print_exception(error, file=f)
        return path
    except OSError:
        return ""


def leave_quietly(line: str | None, code: int, log_path: str | None = None) -> None:
    """Prints `line` (if any) on stderr and exits with `code` at once, as a signal would: a
    second Ctrl-C is ignored from here on, and nothing (threads still running, exit handlers,
    buffered output to a closed pipe) prints after the line: stderr goes to `log_path`, or
    nowhere."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        if line:
            print(line, file=sys.stderr, flush=True)
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(os.open(log_path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT), 2)
    os._exit(code)


def quoted_flags_error(argv: list[str]) -> str | None:
    """What is wrong when a flag and its value, or two flags, were quoted into one argument
    ("--config.num_epochs 3"), else None. absl and ml_collections read the first as a flag whose
    name has a space (blaming the config file, for a --config.x), the second as a value with a
    flag in it."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("--") or arg.strip() != arg:
            continue
        name, equals, value = arg.partition("=")
        if re.search(r"\s", name):
            flag, rest = arg.split(None, 1)
            return (f"{arg!r} is one argument with a space in it, a flag and its value quoted "
                    f"together; write {flag}={rest}")
        if equals and re.search(r"\s--\w", value):
            return (f"{arg!r} is one argument holding several flags (quoted together); pass each "
                    "flag as its own argument")
    return None
