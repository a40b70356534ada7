"""The benchmarks the docs cite, run in a small form so that they cannot rot unseen: each runs to
its end and its last line is the JSON the docs describe. Their figures are not checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, TINY_FLAGS


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
                        *TINY_FLAGS)
    assert report["device"] == "cpu" and report["k"] == 1 and report["batch_size"] == 128
    assert report["compile_s"] > 0 and report["step_device_us"] > 0
    assert report["images_per_second"] > 0 and report["tflops_per_device"] > 0
    assert report["utilization"] is None  # No peak for a CPU.
    assert list((tmp_path / "run" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_throughput_refuses_an_ld_preload_that_did_not_load():
    """ld.so only warns about a missing LD_PRELOAD library and runs on: a run labelled tcmalloc
    would measure glibc's malloc."""
    missing = "/nonexistent/libtcmalloc.so.4"
    result = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--peers=mnist_flax", "--repeats=1",
         "--steps=1", "--warmup=1", "--no-epoch", "--e2e_epochs=0"], capture_output=True,
        text=True, timeout=600, cwd=REPO, env={**os.environ, "LD_PRELOAD": missing})
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: LD_PRELOAD: {missing} did not load"), result.stderr[-3000:]


def test_the_winograd_lead_computes_the_direct_convolution():
    """benchmarks/speed_leads.py's Winograd F(4x4, 3x3) conv2, forward and both gradients, equals
    fast.ops.conv2d to float32 rounding (docs/speed.md states the measured error)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import speed_leads
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import jax
    import numpy as np

    from mnist_flax.fast import ops

    rng = np.random.default_rng(0)
    x, k = rng.standard_normal((2, 10, 10, 3), np.float32), rng.standard_normal((3, 3, 3, 5))
    b, dy = rng.standard_normal(5, np.float32), rng.standard_normal((2, 8, 8, 5), np.float32)
    k = (k * 0.3).astype(np.float32)
    for got, want in zip(speed_leads._with_grads(speed_leads.winograd_conv)(x, k, b, dy),
                         speed_leads._with_grads(ops.conv2d)(x, k, b, dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert jax.numpy.abs(speed_leads.winograd_conv(x, k, b)).max() > 0
