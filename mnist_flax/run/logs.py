"""Log filters of the entry points: library records that a one-line error already says, and
chatter no user needs, added by `run.process.setup_process` (adding one twice adds it once: the
logging module ignores a filter it has)."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import Any

from absl import logging

# What orbax's threads log of an error they hand on: the thread that waits for them raises the
# same exception (a save's `wait_until_finished`, and so `checkpoints.save`, which is one line).
_HANDED_ON = ("_SignalingThread.run() raised an exception",  # futures.future, each worker thread
              "Handler Commit operations or the Commit callback",  # async_checkpointer's commit
              "[wait_until_finished] Save Finalize thread")  # checkpoint_manager's finalize


def _is_orbax(record: std_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" in record.pathname


def _drop_orbax_info(record: std_logging.LogRecord) -> bool:
    """Orbax logs ~30 INFO lines per save through absl; keep its warnings and errors, except the
    one its metadata thread logs when a second Ctrl-C stopped a save and the process is exiting
    (cli says so), and the ones its threads log of an error the waiting thread raises (a full
    disk's E-lines, one per thread, before the run's one line)."""
    if not _is_orbax(record):
        return True
    if record.exc_info:  # A failed save (e.g. a full disk): `save` reports it in one line.
        record.exc_info, record.exc_text = None, None
    message = record.getMessage()
    return record.levelno >= std_logging.WARNING and (
        "cannot schedule new futures after shutdown" not in message) and not any(
        text in message for text in _HANDED_ON)


def _orbax_aftermath(unraisable: Any) -> bool:
    """True for the tracebacks orbax leaves after a failed read or write, which it has already
    raised as an exception: when one tensorstore operation fails, orbax's event loop stops and is
    closed while the others are still in flight; as each finishes, tensorstore's callback finds the
    loop closed ('Event loop is closed'), and the abandoned read coroutines are finalised with
    their errors. Python reports both through sys.unraisablehook, one traceback each."""
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def quiet_orbax_logging() -> None:
    """Keeps orbax's INFO chatter out of the log, and the tracebacks its event loop leaves behind
    after a failed read or write (already reported as one line); entry points call it once."""
    logging.get_absl_logger().addFilter(_drop_orbax_info)
    std_logging.getLogger("asyncio").addFilter(_drop_orbax_task_errors)
    if not isinstance(sys.unraisablehook, _UnraisableFilter):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)


def _drop_orbax_task_errors(record: std_logging.LogRecord) -> bool:
    """The same aftermath through asyncio's logger: 'Task exception was never retrieved' for an
    orbax read task that was abandoned when another read failed first (timing decides which)."""
    error = record.exc_info[1] if record.exc_info else None
    tb = error.__traceback__ if error is not None else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return False
        tb = tb.tb_next
    return True


class _UnraisableFilter:
    """sys.unraisablehook without `_orbax_aftermath`; everything else goes to the previous hook."""

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not _orbax_aftermath(unraisable):
            self.previous(unraisable)


def _drop_gcsfs_giving_up(record: std_logging.LogRecord) -> bool:
    """gcsfs logs each request it gives up on with a traceback, then raises the error, which
    becomes our one-line error: the log record only repeats it."""
    return "out of retries on exception" not in record.getMessage()


def quiet_storage_logging() -> None:
    """For the entry points: a gs:// workdir logs no tracebacks that a one-line error already
    says, and no INFO line per file read (fsspec's read-ahead cache)."""
    std_logging.getLogger("gcsfs").addFilter(_drop_gcsfs_giving_up)
    std_logging.getLogger("fsspec.caching").setLevel(std_logging.WARNING)
