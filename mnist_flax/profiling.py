"""A trace of a few training steps for TensorBoard's profile tab (`config.profile_steps`).

Process 0 traces `profile_steps` consecutive steps with `jax.profiler` once the step has compiled
and run `WARMUP_STEPS` times, into WORKDIR/plugins/profile/SESSION/, where TensorBoard's profile
plugin (the `profile` extra, xprof) finds it. JAX writes the trace into a local directory, which
is then copied into the workdir through `etils.epath`, so a gs:// workdir gets it too. A resumed
run traces again only if the workdir holds no trace yet. A trace that cannot be written is a
warning: the run goes on.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any

import jax
from absl import logging
from etils import epath

from mnist_flax import checkpoints

# Dense peak TFLOP/s of one JAX device, by `device.device_kind`, for (float32, bfloat16) inputs at
# JAX's default matmul precision (float32 runs as bf16 passes on TPU, TF32 on these GPUs). From
# the vendors' pages: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e; NVIDIA's A100 and H100
# (SXM) datasheets. A kind not listed (CPUs) gets no utilisation.
PEAK_TFLOPS = {
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0), "NVIDIA A100-SXM4-40GB": (156.0, 312.0),
    "NVIDIA A100-SXM4-80GB": (156.0, 312.0), "NVIDIA H100 80GB HBM3": (494.0, 989.0)}
WARMUP_STEPS = 5  # Past compilation and the first dispatches' allocations.
PROFILE_DIR = "plugins/profile"  # Under the workdir: TensorBoard's profile plugin reads it.


def peak_tflops(device_kind: str, compute_dtype: str) -> float | None:
    peaks = PEAK_TFLOPS.get(device_kind)
    return None if peaks is None else peaks[compute_dtype == "bfloat16"]


def profile_root(workdir: str) -> epath.Path:
    return checkpoints.path(workdir) / PROFILE_DIR


class StepProfile:
    """Traces `num_steps` steps from `first_step + WARMUP_STEPS` on; the loop calls
    `after_dispatch` after each dispatch, and leaving the context ends a trace still going."""

    def __init__(self, workdir: str, num_steps: int, first_step: int):
        self.root, self.num_steps = profile_root(workdir), num_steps
        self.start: int | None = None
        self.local: str | None = None  # The local directory JAX traces into.
        self.began_at = 0
        if num_steps and jax.process_index() == 0:
            try:
                traced = self.root.is_dir() and any(self.root.iterdir())
            except OSError as e:
                logging.warning("No profile: cannot read %s (%s)", self.root, e)
                return
            if traced:
                logging.info("%s already holds a trace; not tracing again", self.root)
            else:
                self.start = first_step + WARMUP_STEPS

    def __enter__(self) -> StepProfile:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.local is not None:
            self._end()

    def after_dispatch(self, step: int, outputs: Any) -> None:
        """`step`: the steps done after this dispatch; `outputs`: what it returned."""
        if self.start is None or step < self.start:
            return
        if self.local is None:
            self.local, self.began_at = tempfile.mkdtemp(prefix="mnist_flax_profile."), step
            jax.profiler.start_trace(self.local)
        elif step >= self.began_at + self.num_steps:
            jax.block_until_ready(outputs)  # The traced steps' device work, whole.
            self._end()

    def _end(self) -> None:
        """Stops the trace and copies its files into the workdir (a failure is a warning)."""
        local, self.local, self.start = self.local, None, None
        try:
            jax.profiler.stop_trace()
            written = pathlib.Path(local) / PROFILE_DIR  # Local: JAX wrote it.
            for source in written.rglob("*"):
                if source.is_file():
                    target = self.root / source.relative_to(written).as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(source.read_bytes())
            logging.info("Profile of %d steps from step %d in %s (TensorBoard's PROFILE tab)",
                         self.num_steps, self.began_at, self.root)
        except Exception as e:  # noqa: BLE001 (whatever the file system raises: not the run's)
            logging.warning("The profile could not be written to %s (%s); training goes on",
                            self.root, e)
        finally:
            shutil.rmtree(local, ignore_errors=True)
