"""The benchmarks the docs cite, run in a small form so that they cannot rot unseen: each runs to
its end and its last line is the JSON the docs describe. Their figures are not checked here."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def _last_json(*command: str) -> dict:
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_loop_overhead_runs_to_its_json_line():
    report = _last_json("benchmarks/loop_overhead.py", "--rounds=1", "--null_steps=20",
                        "--real_steps=2", "--ks=1,4")
    assert report["k"] in (1, 4) and set(report["after_us_per_step_by_k"]) == {"1", "4"}
    assert report["floor_us"] > 0 and report["images_per_second"] > 0
