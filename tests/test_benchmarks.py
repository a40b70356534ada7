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


def test_the_accelerator_benchmark_runs_here_on_cpu(tmp_path):
    """What a user runs the first time a GPU or TPU is at hand, in a small form on this CPU."""
    report = _last_json("benchmarks/accelerator.py", f"--workdir={tmp_path / 'run'}",
                        "--epochs=2", "--repeats=2", "--config.data_source=sample",
                        "--config.conv_features=(4,8)", "--config.dense_features=16")
    assert report["device"] == "cpu" and report["k"] == 1 and report["batch_size"] == 128
    assert report["compile_s"] > 0 and report["step_device_us"] > 0
    assert report["images_per_second"] > 0 and report["tflops_per_device"] > 0
    assert report["utilization"] is None  # No peak for a CPU.
    assert list((tmp_path / "run" / "plugins" / "profile").glob("*/*.xplane.pb"))
