"""A lease on a workdir in object storage (gs://): one run at a time, and a killed run's claim
runs out by itself.

`WORKDIR/.lock` holds the owner (host, pid, a random token) and an expiry (unix seconds). Every
write is conditional on the object's generation, so two runs cannot both win: acquiring creates
it only if absent (generation 0) or replaces an expired one only at the generation it read; a
daemon thread renews it every ttl/3 at the generation it last wrote; releasing deletes it at that
generation. A renewal that finds the object changed (another run took it over), or that cannot
reach the storage before the lease would run out, sets `Lease.lost`: the run must save no more.

Expiry compares the owner's clock with the reader's, so hosts' clocks must agree (NTP) to well
within the ttl. No library gives this: etils.epath and gcsfs cannot make a write conditional
on a generation, hence google-cloud-storage (which gcsfs depends on). tests/test_lease.py races
runs for one workdir against the GCS emulator, which checks preconditions as GCS does (412).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from mnist_flax import configs

# google-cloud-storage, imported by `acquire` (every other function runs after it): only gs://
# workdirs need it (`workdir.check_client` has made sure it is installed).
exceptions = storage = DEFAULT_RETRY = None

LEASE_FILE = ".lock"
DEFAULT_TTL_S = 60.0
REQUEST_TIMEOUT_S = 10.0  # Per HTTP request; retries stop when the lease has no time left.

log = logging.getLogger(__name__)


class LeaseError(configs.UserError):
    """Another run holds the workdir, or this run lost it; one line naming the owner."""


def utc_text(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(  # noqa: UP017
        "%Y-%m-%d %H:%M:%S UTC")


def _limits(seconds: float) -> dict[str, Any]:
    """Timeout and retry arguments that keep a call (retries included) within `seconds`."""
    seconds = max(seconds, 0.1)
    return {"timeout": min(seconds, REQUEST_TIMEOUT_S),
            "retry": DEFAULT_RETRY.with_timeout(seconds)}


def _read(blob: storage.Blob, seconds: float) -> tuple[int, dict[str, Any]] | None:
    """(generation, owner) of the lease object, or None if there is none."""
    for _ in range(3):
        try:
            blob.reload(**_limits(seconds))
            # The generation reload saw; the download below is pinned to it.
            generation = blob.generation
            data = blob.download_as_bytes(if_generation_match=generation, **_limits(seconds))
            break
        except exceptions.NotFound:
            return None
        except exceptions.PreconditionFailed:
            continue  # Rewritten between reading its generation and its content.
    else:
        raise LeaseError(f"gs://{blob.bucket.name}/{blob.name} keeps changing")
    try:
        owner = json.loads(data)
        owner["expires"] = float(owner["expires"])
    except (ValueError, KeyError, TypeError):
        owner = {"expires": 0.0}  # Unreadable: treated as expired.
    return generation, owner


def _write(blob: storage.Blob, owner: dict[str, Any], if_generation: int, seconds: float) -> int:
    """Writes `owner` if the object is still at `if_generation` (0: absent); its new generation."""
    blob.upload_from_string(json.dumps({**owner, "expires_utc": utc_text(owner["expires"])}),
                            content_type="application/json", if_generation_match=if_generation,
                            **_limits(seconds))
    return blob.generation


class Lease:
    """A held lease, renewed in the background; a context manager that releases it on exit.
    `lost` is set if renewal lost it: the run must save no more."""

    def __init__(self, workdir: str, ttl_s: float, blob: storage.Blob, owner: dict[str, Any],
                 generation: int):
        self.workdir = workdir
        self.ttl_s = ttl_s
        self.owner = owner
        self.lost = threading.Event()
        self.lost_error: Exception | None = None  # Set before `lost` if the storage failed.
        self._blob = blob
        self._generation: int | None = generation
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease renewal {workdir}")
        self._thread.start()

    @property
    def expires(self) -> float:
        """When the lease runs out unless renewed (unix seconds)."""
        return self.owner["expires"]

    def release(self) -> None:
        """Stops renewing and deletes the lease object if it is still ours; idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        generation, self._generation = self._generation, None
        if self.lost.is_set() or generation is None:
            return
        try:
            current = _read(self._blob, REQUEST_TIMEOUT_S)
            if current is not None and current[0] == generation:
                self._blob.delete(if_generation_match=generation, **_limits(REQUEST_TIMEOUT_S))
        except (exceptions.GoogleAPIError, OSError) as e:  # It runs out by itself.
            log.warning("could not release the lease on %s (%s); it runs out at %s",
                        self.workdir, e, utc_text(self.expires))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _renew_loop(self) -> None:
        period = self.ttl_s / 3
        wait = period
        while not self._stop.wait(wait):
            # Give up early enough that no save of ours can land after another run takes over.
            deadline = self.expires - min(period / 2, REQUEST_TIMEOUT_S)
            try:
                if self._renew(deadline - time.time()):
                    wait = period
                    continue
                reason = "another run took it over"
            except Exception as e:  # Network or storage errors: retried until the deadline.
                if time.time() < deadline:
                    log.warning("renewing the lease on %s failed (%s); retrying", self.workdir, e)
                    wait = min(period / 4, max(deadline - time.time(), 0.0))
                    continue
                self.lost_error, reason = e, f"could not renew it before it ran out: {e}"
            log.error("lost the lease on %s: %s", self.workdir, reason)
            self.lost.set()
            return

    def _renew(self, seconds: float) -> bool:
        """Extends the lease by ttl from now; False if it is no longer ours."""
        if seconds <= 0:
            raise TimeoutError("no time left")
        current = _read(self._blob, seconds)
        if current is None or current[0] != self._generation:
            return False
        owner = {**self.owner, "expires": time.time() + self.ttl_s}
        try:
            self._generation = _write(self._blob, owner, current[0], seconds)
        except exceptions.PreconditionFailed:
            current = _read(self._blob, seconds)
            if current is None or current[1].get("token") != owner["token"]:
                return False
            self._generation = current[0]  # Our write landed; only its reply was lost.
        self.owner = owner
        return True


def _dead(owner: dict[str, Any]) -> bool:
    """Whether the lease's owner ran on this host and its process is gone (killed with -9): its
    lease is as good as expired, and waiting for it would only hold up the same command."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # Alive, another user's.
        return False
    return False


def acquire(workdir: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Takes the lease on `workdir` (gs://BUCKET/PATH) for `ttl_s` seconds, renewed in the
    background until released; raises LeaseError if another run holds it."""
    global exceptions, storage, DEFAULT_RETRY
    from google.api_core import exceptions
    from google.cloud import storage
    from google.cloud.storage.retry import DEFAULT_RETRY
    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    key = "/".join(p for p in (prefix.strip("/"), LEASE_FILE) if p)
    blob = storage.Client().bucket(bucket).blob(key)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}
    for _ in range(3):
        current = _read(blob, REQUEST_TIMEOUT_S)
        if current is not None and current[1]["expires"] > time.time() and not _dead(current[1]):
            owner_then = current[1]
            left = owner_then["expires"] - time.time()
            raise LeaseError(
                f"another run (host {owner_then.get('host', '?')}, pid "
                f"{owner_then.get('pid', '?')}) holds the lease on --workdir={workdir} until "
                f"{utc_text(owner_then['expires'])} (in {left:.0f} s unless it renews it); "
                "wait for it or use another workdir")
        if current is not None and current[1]["expires"] > time.time():  # Its process is gone.
            log.warning("taking over the lease on %s of a process that is gone (host %s, pid %s)",
                        workdir, current[1].get("host"), current[1].get("pid"))
        elif current is not None:
            log.warning("taking over the expired lease on %s (host %s, pid %s, ran out at %s)",
                        workdir, current[1].get("host"), current[1].get("pid"),
                        utc_text(current[1]["expires"]))
        owner["expires"] = time.time() + ttl_s
        try:
            generation = _write(blob, owner, current[0] if current else 0, REQUEST_TIMEOUT_S)
        except exceptions.PreconditionFailed:
            continue  # Another run got there first: read who.
        return Lease(workdir, ttl_s, blob, owner, generation)
    raise LeaseError(f"could not take the lease on --workdir={workdir}: it kept changing (other "
                     "runs starting on it?)")
