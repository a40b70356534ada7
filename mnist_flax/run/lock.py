"""One run per workdir: a kernel flock on a local disk, a lease (run.lease) in a bucket. Only
process 0 locks (it alone writes the config and events); all processes agree on whether it got
the lock, and first that they all see the workdir it locks (`check_shared`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np

from mnist_flax import configs
from mnist_flax.run import lease as lease_lib
from mnist_flax.run.storage_errors import storage_stopped_line
from mnist_flax.run.workdir import (
    LEASE_TTL_S,
    LOCK_FILE,
    WorkdirError,
    error_line,
    is_remote,
    path,
)

SHARED_CHECK_FILE = ".shared_check"  # Written by process 0, read by all: do they share the dir?


@dataclasses.dataclass
class Held:
    """The workdir, held by this run (`lock`'s value). `check()` before each save: it raises on
    every process if process 0 lost its lease (storage unreachable, or taken over)."""

    workdir: str
    lease: lease_lib.Lease | None = None  # Process 0's, on a gs:// workdir.

    def check(self) -> None:
        lost = self.lease is not None and self.lease.lost.is_set()
        if on_every_process(not lost):
            return
        if lost:
            raise WorkdirError(lost_lease_line(self.lease))
        raise WorkdirError(f"process 0 lost its lease on --workdir={self.workdir}; this run saves "
                           "no more (see process 0's log)")


@contextlib.contextmanager
def lock(workdir: str, lease_seconds: float = LEASE_TTL_S) -> Iterator[Held]:
    """Holds the workdir while the block runs, so a second run on it stops at once instead of
    interleaving its checkpoints and events with ours. A collective with several processes.

    Locally: an exclusive flock on the workdir directory (`.lock` names the holder's pid), which
    the kernel drops when the process dies, so a SIGKILLed run never blocks the next one. In a
    bucket: a lease on workdir/.lock that a live run renews and a killed run's runs out after
    `lease_seconds`; a run that loses it stops (`_stop_when_lost`).
    """
    check_shared(workdir)
    held = Held(workdir)
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                if is_remote(workdir):
                    held.lease = stack.enter_context(lease_lib.acquire(workdir, lease_seconds))
                    stack.enter_context(_stop_when_lost(held.lease))
                else:
                    stack.enter_context(_flock(workdir))
            except configs.UserError as e:  # WorkdirError, LeaseError
                error = e
        if not on_every_process(error is None):
            raise error or WorkdirError(f"process 0 could not lock --workdir={workdir} (see its "
                                        "error)")
        yield held


def on_every_process(ok: bool) -> bool:
    """True if `ok` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_shared(workdir: str) -> None:
    """With several processes, stops unless all of them read the random token process 0 writes
    (a collective): hosts of a pod slice share no disk, so a local workdir would give each its own
    checkpoints (and process 0's lock would guard only its own). A bucket is shared."""
    if jax.process_count() == 1 or is_remote(workdir):
        return
    from jax.experimental import multihost_utils

    probe = path(workdir) / SHARED_CHECK_FILE
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(secrets.randbits(31)))
    multihost_utils.sync_global_devices("mnist_flax.workdir.check_shared: written")
    try:
        token = int(probe.read_text())
    except (OSError, ValueError):
        token = -1
    tokens = np.asarray(multihost_utils.process_allgather(np.int32(token))).ravel()
    blind = [i for i, t in enumerate(tokens) if t != tokens[0]]
    if jax.process_index() == 0:
        probe.unlink(missing_ok=True)
    if blind:
        raise WorkdirError(
            f"--workdir={workdir} is not shared by the {len(tokens)} processes: process(es) "
            f"{', '.join(map(str, blind))} cannot see what process 0 writes there, so they would "
            "not see its checkpoints; use a bucket all hosts reach, e.g. "
            "--workdir=gs://BUCKET/runs/NAME")


def lost_lease_line(lease: lease_lib.Lease) -> str:
    """The one-line error of a run that lost its lease: the storage went away, or another run
    took the workdir over."""
    if lease.lost_error is None:
        return (f"another run took over the lease on --workdir={lease.workdir}; this run saves "
                "no more and stops; its last committed checkpoint is intact")
    return storage_stopped_line(f"the lease on --workdir={lease.workdir} could not be renewed "
                                f"before {lease_lib.utc_text(lease.expires)}: "
                                f"{error_line(lease.lost_error)}")


@contextlib.contextmanager
def _stop_when_lost(lease: lease_lib.Lease) -> Iterator[None]:
    """Ends the process if the lease is lost and the run has not ended by itself when it runs out.

    The loop checks the lease only before a save, and a save or an event flush in flight when
    the storage goes away waits in its client's retries for many minutes. Nothing can be saved
    any more and the last committed checkpoint is intact, so when the lease runs out (at once if
    another run took it over) we print the one-line error and exit 1, as a kill would: nothing of
    ours can land in the workdir after another run may have taken it.
    """
    ended = threading.Event()

    def watch() -> None:
        while not ended.wait(0.05):  # Soon after the loss: a save in flight stops with us.
            if lease.lost.is_set():
                break
        left = lease.expires - time.time() if lease.lost_error is not None else 0.0
        if ended.wait(max(left, 0.0)):
            return
        print(f"error: {lost_lease_line(lease)}", file=sys.stderr, flush=True)
        os._exit(1)

    watchdog = threading.Thread(target=watch, daemon=True, name="lease watchdog")
    watchdog.start()
    try:
        yield
    finally:
        ended.set()


def holder(workdir: str) -> str | None:
    """The pid (as text) of another run holding a local `workdir`, or None when none does (or
    this process holds it: main restores under its own lock)."""
    root = path(workdir)
    if is_remote(workdir) or not root.is_dir():
        return None
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pid = holder_pid(root)
        return None if pid == str(os.getpid()) else pid
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    """The kernel's flock on the workdir directory itself, which nobody deletes as stale (a
    deleted .lock file would let a second run in); `.lock` only names the holder's pid."""
    root = path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder_pid(root)
        raise WorkdirError(f"another run (pid {pid}) is using --workdir={workdir}; wait "
                           "for it or use another workdir") from None
    try:
        # Never through a link (`workdir.check_layout` refuses one): it may leave the workdir.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with os.fdopen(os.open(root / LOCK_FILE, flags, 0o644), "w") as f:
            f.write(f"{os.getpid()}\n")
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holder_pid(root) -> str:
    try:
        return (root / LOCK_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


