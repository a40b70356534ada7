"""The workdir as a place: its path (local or gs://), the one-run lock, config.json, stop signals.

Every path under a workdir goes through `etils.epath`, the path layer orbax uses, so a local
directory and a `gs://` bucket behave the same. Only process 0 locks and writes config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

CONFIG_FILE = "config.json"  # The config the run was started (or resumed) with.
LOCK_FILE = ".lock"  # Held by the run using the workdir; holds that run's pid.
# Exit status of a run stopped by SIGTERM after saving its checkpoint: 128 + SIGTERM, what a
# shell reports for a process SIGTERM ended, so job systems see "terminated" and can restart it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Exit status of a run stopped by Ctrl-C (SIGINT), with or without saving: what a shell reports.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkdirError(ValueError):
    """A workdir that cannot be used (a file, not writable, busy, unreadable config); one line."""


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM or SIGINT arrived; the checkpoint at `step` was saved and the run should exit with
    `exit_code` (143 or 130)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(stop_message(step, signum))
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum


def path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an epath: absolute when local, unchanged when a URL such as gs://."""
    text = os.fspath(workdir)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def is_remote(workdir: str | os.PathLike) -> bool:
    return "://" in os.fspath(workdir)


def prepare(workdir: str) -> None:
    """Creates the workdir if needed; refuses a path that is a file or cannot be written."""
    if not workdir:
        raise WorkdirError("--workdir is empty; pass a directory, e.g. --workdir=runs/")
    root = path(workdir)
    if root.exists() and not root.is_dir():
        raise WorkdirError(f"--workdir={workdir}: exists and is not a directory; pick another path")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); "
                           "pick a writable directory") from None


# ---------------------------------------------------------------------------------------------
# One run per workdir.


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
    """Holds an exclusive flock on workdir/.lock while the block runs, so a second run on the same
    workdir stops at once instead of interleaving its checkpoints and events with ours.

    The kernel drops the lock when the process dies, so a SIGKILLed run never blocks the next one.
    Only process 0 locks: it alone writes the config and events.
    """
    if jax.process_index() != 0:
        yield
        return
    root = path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise WorkdirError(f"another run (pid {pid}) is using --workdir={workdir}; wait "
                               "for it or use another workdir") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# The config stored with the run.


def config_path(workdir: str) -> epath.Path:
    return path(workdir) / CONFIG_FILE


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes workdir/config.json (process 0 only); predict builds the model from it."""
    if jax.process_index() != 0:
        return
    target = config_path(workdir)
    target.parent.mkdir(parents=True, exist_ok=True)  # train_and_evaluate may run without main.
    tmp = target.with_name(f"{CONFIG_FILE}.tmp.{os.getpid()}")
    tmp.write_text(config.to_json(indent=2, sort_keys=True))
    tmp.replace(target)  # Atomic locally; an object store writes whole objects anyway.


def read_config(workdir: str) -> ml_collections.ConfigDict:
    source = config_path(workdir)
    try:
        return ml_collections.ConfigDict(json.loads(source.read_text()))
    except FileNotFoundError:
        raise WorkdirError(f"{source}: not found; is {workdir} a training workdir?") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not even UTF-8 (damaged).
        raise WorkdirError(f"{source}: unreadable ({e})") from None


def config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """'name: old -> new' for every field that differs from the config stored in the workdir."""
    if not config_path(workdir).exists():
        return []
    old = read_config(workdir).to_dict()
    new = json.loads(config.to_json())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------------------------------
# SIGTERM (a preemption) and SIGINT (Ctrl-C).


@dataclasses.dataclass
class StopFlag:
    """While installed, SIGTERM and SIGINT only set `requested` and remember the first `signum`;
    the loop finishes its step, saves and stops. A second Ctrl-C raises KeyboardInterrupt at once
    (the first puts Python's default handler back), for a user who will not wait for the save.

    A context manager: leaving it puts the previous handlers back. A signal the process ignores
    (SIGINT in a background job, nohup) stays ignored. Outside the main thread (where Python
    cannot install handlers) it does nothing and both signals keep their usual meaning.
    """

    requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    signum: int | None = None
    _previous: dict[int, Any] = dataclasses.field(default_factory=dict)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.signum is None:
            self.signum = signum
        self.requested.set()

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def is_set(self) -> bool:
        return self.requested.is_set()


def stop_message(step: int, signum: int) -> str:
    if signum == signal.SIGINT:
        return (f"Interrupted (Ctrl-C) at step {step}; checkpoint saved; exiting with status "
                f"{INTERRUPTED_EXIT_CODE}. Run the same command to resume.")
    return (f"SIGTERM: saved the checkpoint at step {step}; exiting with status "
            f"{128 + signum}. Run the same command again to resume.")


def log_preempted(step: int, signum: int = signal.SIGTERM) -> None:
    logging.warning("%s", stop_message(step, signum))
