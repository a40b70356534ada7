"""A `--multihost` start whose peers never come ends, within the stated wait, with one line naming
the coordinator and the fix (JAX alone prints nothing for 5 minutes, then aborts with a C++ stack).
"""

from __future__ import annotations

import socket
import time

import pytest
from conftest import run_module

WAIT_S = 3
SCRIPT = """
import sys, time
from absl import logging
from mnist_flax.run import boundary, process
logging.set_verbosity("info")
with boundary.one_line_errors():
    print(f"waiting from {{time.time()}}", file=sys.stderr, flush=True)
    process.initialize_distributed("{address}", 2, {process_id}, timeout_s={wait})
"""


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("process_id", [0, 1])  # 0: the coordinator alone; 1: no coordinator.
def test_a_multihost_start_without_its_peers_ends_with_one_line_in_the_stated_time(process_id):
    address = free_address()
    result = run_module("", script=SCRIPT.format(address=address, process_id=process_id,
                                                 wait=WAIT_S), timeout=180)
    ended = time.time()
    lines = result.stderr.strip().splitlines()
    tail = "\n".join(lines[-15:])
    started = float(next(line for line in lines if line.startswith("waiting from")).split()[-1])
    assert result.returncode == 1, tail
    assert f"waiting up to {WAIT_S} s for every process to reach the coordinator {address}" in (
        result.stderr), tail
    assert lines[-1] == (
        f"error: --multihost: not all 2 processes reached the coordinator {address} within "
        f"{WAIT_S} s; start the same command on every host (process 0 on the coordinator's) and "
        "check that its port is reachable from each"), tail
    assert "Check failure" not in result.stderr and "Traceback" not in result.stderr, tail
    # The wait, then the exit: 20 s leaves room for a machine 3x slower than ours (about 1 s).
    assert WAIT_S <= ended - started < WAIT_S + 20, tail
