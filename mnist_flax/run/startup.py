"""Ctrl-C before an entry point's error boundary exists: one line and exit status 130, not
Python's traceback.

An entry module (main, sweep, predict) spends seconds importing jax, orbax and TensorFlow
Datasets before `boundary.one_line_errors` can run; a Ctrl-C there is a KeyboardInterrupt that
nothing catches, which Python prints as a traceback. This module imports only the standard
library, so an entry module imports it first and wraps its imports (and whatever it does before
the boundary) in `one_line_interrupts`. The interrupt still propagates, so a notebook importing
`mnist_flax.predict` gets its KeyboardInterrupt as usual; only one that reaches the top level
uncaught becomes the one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import TracebackType

# What a shell reports for a process Ctrl-C ended (run.signals uses this one too).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
INTERRUPTED_LINE = ("Interrupted (Ctrl-C): stopped at once without saving; the checkpoints "
                    "already in the workdir are intact. Run the same command to resume.")
PREDICT_INTERRUPTED_LINE = "Interrupted (Ctrl-C): stopped; predict writes nothing to the workdir."


@contextlib.contextmanager
def one_line_interrupts(line: str = INTERRUPTED_LINE) -> Iterator[None]:
    """Around an entry module's imports and start-up: a Ctrl-C in them that nothing catches
    prints `line` and exits 130 (through `sys.excepthook`, which Python calls only for an
    exception no caller handled)."""
    try:
        yield
    except KeyboardInterrupt:
        if not isinstance(sys.excepthook, _OneLineInterrupt):
            sys.excepthook = _OneLineInterrupt(sys.excepthook, line)
        raise


class _OneLineInterrupt:
    """sys.excepthook: an uncaught KeyboardInterrupt is `line` and exit 130; any other exception
    goes to the previous hook."""

    def __init__(self, previous, line: str):
        self.previous, self.line = previous, line

    def __call__(self, kind: type[BaseException], error: BaseException,
                 tb: TracebackType | None) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            self.previous(kind, error, tb)
            return
        leave_quietly(self.line, INTERRUPTED_EXIT_CODE)


def leave_quietly(line: str, code: int) -> None:
    """Prints `line` on stderr and exits with `code` at once, as a signal would: a second Ctrl-C
    is ignored from here on, and nothing (exit handlers, buffered output to a closed pipe) can
    print after the line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        print(line, file=sys.stderr, flush=True)
    os._exit(code)
