"""The workdir as a place: its path (local or gs://), the one-run lock, config.json, stop signals.

Every path under a workdir goes through `etils.epath`, the path layer orbax uses, so a local
directory and a `gs://` bucket behave the same (gcsfs underneath, from the `gcs` extra). Only
process 0 locks and writes config.json. The lock is a kernel flock on a local disk and a lease
(mnist_flax.lease) in a bucket, where no flock exists. With several processes (a pod slice),
`check_shared` stops a run whose hosts do not all see the same workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging as std_logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mnist_flax import lease as lease_lib

CONFIG_FILE = "config.json"  # The config the run was started (or resumed) with.
LOCK_FILE = ".lock"  # Held by the run using the workdir; holds that run's pid (or its lease).
SHARED_CHECK_FILE = ".shared_check"  # Written by process 0, read by all: do they share the dir?
# How long a gs:// workdir stays locked after its run dies without releasing it (kill -9, a lost
# VM); a live run renews its lease every third of it. README, "TPU VMs", says why a lease.
LEASE_TTL_S = lease_lib.DEFAULT_TTL_S
GCS_EXTRA = "pip install 'mnist_flax[gcs]'"
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
    if is_remote(text):
        check_client(text)
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def is_remote(workdir: str | os.PathLike) -> bool:
    return "://" in os.fspath(workdir)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # A parent package (google.cloud) is missing.
        return False


def check_client(workdir: str) -> None:
    """One line if `workdir` is a URL we cannot write: not gs://, or the `gcs` extra is missing.

    Without it epath, tensorboardX and orbax each fail differently (and tensorboardX prints a
    traceback from a destructor), so every entry point asks here first.
    """
    if not is_remote(workdir):
        return
    if not workdir.startswith("gs://"):
        raise WorkdirError(f"--workdir={workdir}: only local directories and gs:// URLs are "
                           "supported")
    missing = [m for m in ("gcsfs", "google.cloud.storage") if not _installed(m)]
    if missing:
        raise WorkdirError(f"--workdir={workdir}: a gs:// workdir needs {' and '.join(missing)}, "
                           f"which the gcs extra installs: {GCS_EXTRA}")


def prepare(workdir: str) -> None:
    """Creates the workdir if needed; refuses a path that is a file or cannot be written.

    In a bucket, mkdir succeeds even when the bucket does not exist: only the probe write shows
    a missing bucket (FileNotFoundError) or missing permission.
    """
    if not workdir:
        raise WorkdirError("--workdir is empty; pass a directory, e.g. --workdir=runs/")
    root = path(workdir)
    try:
        # is_file, not "exists and not is_dir": on a pod every host runs this at once, and in a
        # bucket a prefix holding only another host's probe exists, then is gone by is_dir.
        if root.is_file():
            raise WorkdirError(f"--workdir={workdir}: exists and is not a directory; pick another "
                               "path")
        root.mkdir(parents=True, exist_ok=True)
        # Random: every host of a pod probes the same bucket, and their pids may coincide.
        probe = root / f".write_test.{os.getpid()}.{secrets.token_hex(4)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        if is_remote(workdir):
            bucket = workdir[len("gs://"):].split("/")[0]
            if is_storage_error(e):
                raise WorkdirError(storage_unreachable_line(workdir, e)) from None
            if _forbidden(e):
                raise WorkdirError(f"--workdir={workdir}: cannot write there ("
                                   f"{_forbidden_reason(e, bucket)}") from None
            reason = (f"bucket {bucket} does not exist" if isinstance(e, FileNotFoundError)
                      else error_line(e))
            raise WorkdirError(f"--workdir={workdir}: cannot write there ({reason}); create the "
                               "bucket (gcloud storage buckets create gs://BUCKET) or pick one "
                               "this machine's service account can write") from None
        raise WorkdirError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); "
                           "pick a writable directory") from None


def _forbidden(e: OSError) -> bool:
    """Whether the bucket refused a write (HTTP 403); gcsfs raises OSError('Forbidden: ...')."""
    return isinstance(e, PermissionError) or str(e).startswith("Forbidden")


def _forbidden_reason(e: OSError, bucket: str) -> str:
    """Who may not write to the bucket, and the fix, from GCS's answer to a 403 ('PRINCIPAL does
    not have storage.objects.create access to ...')."""
    found = re.search(r"(\S+) does not have (storage\.[\w.]+) access", str(e))
    if found:
        principal, permission = found.groups()
        reason = f"{principal} lacks {permission} on bucket {bucket}"
        member = (f"serviceAccount:{principal}" if principal.endswith(".gserviceaccount.com")
                  else f"user:{principal}")
    else:
        reason = f"this machine's credentials may not write to bucket {bucket}"
        member = "PRINCIPAL"
    return (f"403 Forbidden: {reason}); grant write access (gcloud storage buckets "
            f"add-iam-policy-binding gs://{bucket} --member={member} "
            "--role=roles/storage.objectAdmin) or pick another bucket")


# Where the clients of a gs:// workdir (google-cloud-storage, gcsfs) raise from when the network
# or the bucket goes away, after their own retries.
_STORAGE_ERROR_MODULES = ("google.api_core.", "google.auth.", "aiohttp.", "requests.", "urllib3.")


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, ConnectionError | TimeoutError) or any(
        type(e).__module__.startswith(m) for m in _STORAGE_ERROR_MODULES)


def storage_unreachable_line(workdir: str, e: BaseException) -> str:
    """The one-line error for a workdir whose storage does not answer (network, endpoint)."""
    return (f"--workdir={workdir}: its storage did not answer ({error_line(e)}); check the "
            "network and the bucket, then run again")


def storage_stopped_line(why: str) -> str:
    """The one-line error for a run whose workdir's storage stopped answering mid-run."""
    return (f"the workdir's storage stopped answering ({why}); the last committed checkpoint is "
            "intact; run the same command again when it answers")


class _DropGcsfsGivingUp(std_logging.Filter):
    """gcsfs logs each request it gives up on with a traceback, then raises the error, which
    becomes our one-line error: the log record only repeats it."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "out of retries on exception" not in record.getMessage()


_DROP_GCSFS_GIVING_UP = _DropGcsfsGivingUp()


def quiet_storage_logging() -> None:
    """For the entry points: a gs:// workdir logs no tracebacks that a one-line error already
    says, and no INFO line per file read (fsspec's read-ahead cache). Idempotent."""
    logger = std_logging.getLogger("gcsfs")
    if _DROP_GCSFS_GIVING_UP not in logger.filters:
        logger.addFilter(_DROP_GCSFS_GIVING_UP)
    std_logging.getLogger("fsspec.caching").setLevel(std_logging.WARNING)


def error_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' (at most `limit` characters of it), for one-line errors."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:limit]}"


def _on_every_process(ok: bool) -> bool:
    """True if `ok` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_shared(workdir: str) -> None:
    """With several processes, stops unless all of them see the same workdir (a collective).

    Process 0 writes a random token; after a barrier every process reads it back. Hosts of a pod
    slice share no disk, so a local workdir would give each host its own checkpoints (and process
    0's lock would guard only its own): the fix is a bucket. A gs:// workdir is shared already.
    """
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


# ---------------------------------------------------------------------------------------------
# One run per workdir.


@dataclasses.dataclass
class Held:
    """The workdir, held by this run (`lock`'s value). `check()` before each save: it raises on
    every process if process 0 lost its lease (storage unreachable, or taken over)."""

    workdir: str
    lease: lease_lib.Lease | None = None  # Process 0's, on a gs:// workdir.

    def check(self) -> None:
        lost = self.lease is not None and self.lease.lost.is_set()
        if _on_every_process(not lost):
            return
        if lost:
            raise WorkdirError(lost_lease_line(self.lease))
        raise WorkdirError(f"process 0 lost its lease on --workdir={self.workdir}; this run saves "
                           "no more (see process 0's log)")


@contextlib.contextmanager
def lock(workdir: str, lease_seconds: float = LEASE_TTL_S) -> Iterator[Held]:
    """Holds the workdir while the block runs, so a second run on it stops at once instead of
    interleaving its checkpoints and events with ours. A collective with several processes.

    Locally: an exclusive flock on workdir/.lock, which the kernel drops when the process dies,
    so a SIGKILLed run never blocks the next one. In a bucket: a lease on workdir/.lock that a
    live run renews and a killed run's runs out after `lease_seconds`; a run that loses it stops
    (`_stop_when_lost`). Only process 0 locks (it alone writes the config and events); all
    processes agree on whether it got the lock.
    """
    held = Held(workdir)
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                if is_remote(workdir):
                    held.lease = stack.enter_context(_lease(workdir, lease_seconds))
                    stack.enter_context(_stop_when_lost(held.lease))
                else:
                    stack.enter_context(_flock(workdir))
            except WorkdirError as e:
                error = e
        if not _on_every_process(error is None):
            raise error or WorkdirError(f"process 0 could not lock --workdir={workdir} (see its "
                                        "error)")
        yield held


def _lease(workdir: str, seconds: float) -> lease_lib.Lease:
    try:
        return lease_lib.acquire(workdir, ttl_s=seconds)
    except lease_lib.LeaseError as e:
        raise WorkdirError(str(e)) from None


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
        while not ended.wait(0.25):
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


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
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
    text = config.to_json(indent=2, sort_keys=True)
    if is_remote(workdir):  # An object is written whole; gcsfs renames are copies (slow).
        target.write_text(text)
        return
    tmp = target.with_name(f"{CONFIG_FILE}.tmp.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(target)  # Atomic: a reader never sees half a file.


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

    def agreed(self) -> bool:
        """Whether any process got a stop signal. On a pod every process must stop after the same
        step, or the others wait for it in the save's collectives; a process stopped by a peer
        exits as preempted (143). One small all-gather per call when there are several processes.
        """
        anywhere = not _on_every_process(not self.is_set())
        if anywhere and self.signum is None:
            self.signum = signal.SIGTERM
        return anywhere


def stop_message(step: int, signum: int) -> str:
    if signum == signal.SIGINT:
        return (f"Interrupted (Ctrl-C) at step {step}; checkpoint saved; exiting with status "
                f"{INTERRUPTED_EXIT_CODE}. Run the same command to resume.")
    return (f"SIGTERM: saved the checkpoint at step {step}; exiting with status "
            f"{128 + signum}. Run the same command again to resume.")


def log_preempted(step: int, signum: int = signal.SIGTERM) -> None:
    logging.warning("%s", stop_message(step, signum))
