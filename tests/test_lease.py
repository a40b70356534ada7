"""The workdir lease on object storage, against the GCS emulator: one run at a time, a killed
run's lease runs out, renewal keeps a live one, and a run that loses its lease learns it.

The emulator checks generation preconditions as GCS does (412 when one does not hold), so runs
racing for the same workdir at the same moment are settled as on GCS: exactly one wins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO
from gcs_emulator import gcs_bucket_path, gcs_emulator, separate_emulator  # noqa: F401

pytest.importorskip("google.cloud.storage")

from mnist_flax.run import lease  # noqa: E402
from mnist_flax.run import lock as lock_lib


def _lock_blob(workdir: str):
    from google.cloud import storage

    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    return storage.Client().bucket(bucket).blob(f"{prefix}/{lease.LEASE_FILE}")


def test_the_emulator_answers_a_failed_precondition_with_412(gcs_bucket_path):  # noqa: F811
    # What the lease relies on (GCS's behaviour): a conditional write settles a race.
    from google.api_core import exceptions

    blob = _lock_blob(gcs_bucket_path)
    blob.upload_from_string("first", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        _lock_blob(gcs_bucket_path).upload_from_string("second", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        _lock_blob(gcs_bucket_path).delete(if_generation_match=blob.generation + 1)
    assert _lock_blob(gcs_bucket_path).download_as_text() == "first"


# One racer: takes the lease on each workdir read from stdin, printing the outcome as JSON.
# `_write` is wrapped only to count the 412s (the races the emulator settled), never changed.
RACER = textwrap.dedent("""
    import json, sys
    from google.api_core import exceptions
    from mnist_flax.run import lease

    write = lease._write
    def counted(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except exceptions.PreconditionFailed:
            print(json.dumps({"precondition_failed": True}), flush=True)
            raise
    lease._write = counted

    held = []
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            held.append(lease.acquire(line.strip(), ttl_s=30))
            print(json.dumps({"won": True}), flush=True)
        except lease.LeaseError as e:
            print(json.dumps({"lost": str(e)}), flush=True)
    for lease_held in held:
        lease_held.release()
    """)
RACERS, ROUNDS = 4, 5


def test_runs_racing_for_a_workdir_one_wins_the_others_name_it(gcs_emulator,  # noqa: F811
                                                               gcs_bucket_path):  # noqa: F811
    env = {**os.environ, **gcs_emulator.env,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    racers = [subprocess.Popen([sys.executable, "-c", RACER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(RACERS)]
    races = 0

    def outcome(racer) -> dict:
        nonlocal races
        while True:
            reply = json.loads(racer.stdout.readline())
            if "precondition_failed" not in reply:
                return reply
            races += 1

    try:
        assert all(outcome(racer) == {"ready": True} for racer in racers)
        for n in range(ROUNDS):
            workdir = f"{gcs_bucket_path}/round{n}"
            for racer in racers:  # All at once: each starts as soon as it reads the line.
                racer.stdin.write(workdir + "\n")
                racer.stdin.flush()
            outcomes = {racer.pid: outcome(racer) for racer in racers}
            winners = [pid for pid, o in outcomes.items() if "won" in o]
            assert len(winners) == 1, (n, outcomes)
            assert json.loads(_lock_blob(workdir).download_as_text())["pid"] == winners[0]
            for pid, o in outcomes.items():
                if pid != winners[0]:
                    assert f"pid {winners[0]}) holds the lease on --workdir={workdir}" in o["lost"]
    finally:
        for racer in racers:
            racer.stdin.close()
        for racer in racers:
            racer.wait(timeout=30)
    # Usually every loser: all read "no lease" before any wrote. Without a race, a loser just
    # reads the winner's lease, and this test would prove nothing about the 412.
    assert races >= 1, "no round raced"
    print(f"{races} of the losers' writes got 412 in {ROUNDS} rounds of {RACERS} racers")


def test_second_acquire_fails_with_one_line_naming_the_owner(gcs_bucket_path):  # noqa: F811
    with lease.acquire(gcs_bucket_path, ttl_s=30) as held:
        with pytest.raises(lease.LeaseError) as e:
            lease.acquire(gcs_bucket_path, ttl_s=30)
        message = str(e.value)
        assert "\n" not in message
        assert f"pid {os.getpid()}" in message and f"--workdir={gcs_bucket_path}" in message
        assert "until" in message and "UTC" in message
        assert not held.lost.is_set()


def test_release_frees_the_workdir(gcs_bucket_path):  # noqa: F811
    held = lease.acquire(gcs_bucket_path, ttl_s=30)
    assert _lock_blob(gcs_bucket_path).exists()
    held.release()
    held.release()  # Idempotent.
    assert not _lock_blob(gcs_bucket_path).exists()
    lease.acquire(gcs_bucket_path, ttl_s=30).release()


def test_renewal_keeps_the_lease_past_its_ttl(gcs_bucket_path):  # noqa: F811
    with lease.acquire(gcs_bucket_path, ttl_s=2.0) as held:
        first_expiry = held.expires
        time.sleep(4.5)
        with pytest.raises(lease.LeaseError):
            lease.acquire(gcs_bucket_path, ttl_s=2.0)
        assert held.expires > first_expiry + 2.0
        assert not held.lost.is_set()


def test_a_killed_runs_lease_is_taken_over_at_once_on_its_host_and_runs_out_elsewhere(
        gcs_emulator, gcs_bucket_path):  # noqa: F811
    """`kill -9`, then the same command on the same host: the lease's pid is gone there, so it
    does not wait out the lease. Seen from another host the same lease holds until it expires."""
    script = textwrap.dedent(f"""
        import time
        from mnist_flax.run import lease
        lease.acquire({gcs_bucket_path!r}, ttl_s=2.0)
        print("acquired", flush=True)
        time.sleep(60)
        """)
    env = {**os.environ, **gcs_emulator.env,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "acquired"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    blob = _lock_blob(gcs_bucket_path)
    owner = json.loads(blob.download_as_text())
    assert owner["pid"] == child.pid
    with lease.acquire(gcs_bucket_path, ttl_s=2.0) as held:  # At once: its process is gone.
        assert json.loads(blob.download_as_text())["pid"] == os.getpid()
        assert not held.lost.is_set()

    # Released; now another host's run holds it, with the same (there meaningless) pid.
    lease._write(blob, {**owner, "host": "another-host", "expires": time.time() + 2.0}, 0, 10)
    with pytest.raises(lease.LeaseError, match=f"host another-host, pid {child.pid}"):
        lease.acquire(gcs_bucket_path, ttl_s=2.0)
    time.sleep(2.5)
    lease.acquire(gcs_bucket_path, ttl_s=2.0).release()  # Expired: taken over.


def test_a_lease_taken_over_by_another_run_is_lost(gcs_bucket_path):  # noqa: F811
    with lease.acquire(gcs_bucket_path, ttl_s=1.5) as held:
        # What another run does when it judges the lease expired (e.g. its clock runs ahead).
        _lock_blob(gcs_bucket_path).upload_from_string(json.dumps(
            {"host": "elsewhere", "pid": 1, "token": "other", "expires": time.time() + 60}))
        assert held.lost.wait(timeout=5)
        assert lock_lib.lost_lease_line(held) == (
            f"another run took over the lease on --workdir={gcs_bucket_path}; this run saves no "
            "more and stops; its last committed checkpoint is intact")
    # Releasing a lost lease leaves the other run's object alone.
    assert json.loads(_lock_blob(gcs_bucket_path).download_as_text())["host"] == "elsewhere"


def test_storage_going_away_loses_the_lease_before_it_runs_out(tmp_path, monkeypatch):
    with separate_emulator(tmp_path) as emulator:
        for name, value in emulator.env.items():
            monkeypatch.setenv(name, value)
        # ttl 6 s: the renewals give up half a period (1 s) before it runs out; at 2 s (0.33 s
        # early) a run beside two other test workers on 2 cores gave up 0.13 s late.
        held = lease.acquire(f"gs://{emulator.bucket}/run", ttl_s=6.0)
        emulator.stop()
        assert held.lost.wait(timeout=15)
        assert time.time() < held.expires  # Given up before another run could take over.
        line = lock_lib.lost_lease_line(held)
        assert line.startswith(f"the workdir's storage stopped answering (the lease on "
                               f"--workdir=gs://{emulator.bucket}/run could not be renewed "
                               "before "), line
        assert "\n" not in line
        held.release()  # Nothing to delete, and no error.
