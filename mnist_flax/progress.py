"""The loop's bookkeeping: how many steps a dispatch runs, progress lines, an epoch's metrics.

Train metrics stay on the device until a progress line (every `log_every_steps` and at each
epoch's end) brings them to the host once, checks the loss is finite and logs images/s and ETA.
"""

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mnist_flax import configs

# How many dispatches the host may run ahead of the devices. Unbounded, the host queued ~16 steps
# on XLA:CPU's virtual devices, whose per-device limit on launched computations then starved one
# device's share of a step while the others waited in its all-reduce, and XLA aborted the process
# (docs/reliability.md, "Data parallel on CPU"). A few dispatches ahead keep any device busy.
MAX_DISPATCHES_AHEAD = 4


class TrainingDivergedError(configs.UserError):  # The loss or the parameters became NaN or Inf.
    pass


def check_finite(losses: list[float], last_step: int, what: str = "training loss") -> None:
    """Raises on the first NaN/Inf among the per-step `losses` (or another per-step `what`) of
    the steps up to `last_step`."""
    for offset, loss in enumerate(losses):
        if not math.isfinite(loss):
            step = last_step - len(losses) + 1 + offset
            raise TrainingDivergedError(
                f"{what} became {loss} at step {step}; stopped without saving it (the last "
                "good checkpoint, if any, is kept); lower --config.learning_rate")


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def chunk_steps(step: int, k: int, steps_per_epoch: int, num_steps: int,
                config: ml_collections.ConfigDict) -> int:
    """How many steps the dispatch starting at `step` runs: up to `k`, never past the end of the
    epoch, a progress line, a checkpoint or the run."""
    stops = [num_steps, (step // steps_per_epoch + 1) * steps_per_epoch]
    for every in (config.log_every_steps, config.checkpoint_every_steps):
        if every:
            stops.append((step // every + 1) * every)
    return min(k, min(stops) - step)


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Train metrics kept on device until a progress line; the epoch's averages and speed."""

    def __init__(self, config: ml_collections.ConfigDict, num_steps: int, steps_per_epoch: int,
                 schedule: optax.Schedule, start_step: int = 0,
                 flops_per_step: float | None = None, peak_tflops: float | None = None):
        """Logs where a run restored from a checkpoint (`start_step` > 0) starts. With the step's
        FLOPs (and a device's peak TFLOP/s), an epoch also reports TFLOP/s per device (and the
        share of the peak)."""
        self.config, self.num_steps, self.steps_per_epoch = config, num_steps, steps_per_epoch
        self.schedule, self.flops_per_step, self.peak_tflops = schedule, flops_per_step, peak_tflops
        if start_step >= num_steps:
            logging.info("The checkpoint at step %d has finished all %d epochs: nothing to train",
                         start_step, config.num_epochs)
        elif start_step:
            logging.info("Resuming from the checkpoint at step %d (epoch %d, step %d of it)",
                         start_step, start_step // steps_per_epoch + 1,
                         start_step % steps_per_epoch)
        self.pending: list[dict[str, jax.Array]] = []  # Since the last progress line.
        self.logged: list[dict[str, float]] = []  # This epoch's progress lines.
        self.metrics: dict[str, float] = {}  # The last epoch's.
        self.last_log = self.epoch_start = (time.perf_counter(), 0)  # (time, step)

    def start_epoch(self, step: int) -> None:
        self.logged = []
        self.last_log = self.epoch_start = (time.perf_counter(), step)

    def add(self, step_metrics: dict[str, jax.Array], done: int, end_of_epoch: bool) -> None:
        """Keeps one dispatch's metrics, and the host at most MAX_DISPATCHES_AHEAD dispatches ahead
        of the devices; every log_every_steps (and at epoch end) logs a line."""
        self.pending.append(step_metrics)
        if len(self.pending) > MAX_DISPATCHES_AHEAD:  # Wait for the dispatch that far back.
            jax.block_until_ready(self.pending[-MAX_DISPATCHES_AHEAD - 1])
        if done % self.config.log_every_steps and not end_of_epoch:
            return
        host, self.pending = jax.device_get(self.pending), []
        per_step = {k: np.concatenate([np.ravel(m[k]) for m in host]) for k in host[0]}
        check_finite([float(loss) for loss in per_step["loss"]], done)
        if "grad_norm" in per_step:  # A finite loss can still come with NaN gradients.
            check_finite([float(norm) for norm in per_step["grad_norm"]], done, "gradient norm")
        mean = {k: float(np.mean(v)) for k, v in per_step.items()}
        self.logged.append({**mean, "n": len(per_step["loss"])})
        now, (then, last_step) = time.perf_counter(), self.last_log
        images_per_second = (done - last_step) * self.config.batch_size / (now - then)
        self.last_log = (now, done)
        eta = (self.num_steps - done) * self.config.batch_size / images_per_second
        logging.info("epoch %d/%d step %d/%d: loss %.4f accuracy %.4f | %.0f images/s | ETA %s",
                     (done - 1) // self.steps_per_epoch + 1, self.config.num_epochs, done,
                     self.num_steps, mean["loss"], mean["accuracy"], images_per_second,
                     format_duration(eta))

    def check_savable(self, state, step: int) -> None:
        """Refuses to checkpoint a diverged state, which would push the last good checkpoint out:
        the losses since the last progress line, and every parameter (a finite loss can still
        give NaN gradients), for a few ms a save."""
        losses = jax.device_get([m["loss"] for m in self.pending])  # (k,) per dispatch.
        check_finite([float(loss) for chunk in losses for loss in np.ravel(chunk)], step)
        if not bool(_all_finite(state.params)):
            raise TrainingDivergedError(
                f"the parameters became NaN or Inf at step {step}; stopped without saving them "
                "(the last good checkpoint, if any, is kept); lower --config.learning_rate")

    def end_epoch(self, done: int, test: dict[str, float]) -> dict[str, float]:
        """The epoch's metrics by their TensorBoard names (summaries.SCALAR_TAGS), logged."""
        total = sum(m["n"] for m in self.logged)
        seconds = time.perf_counter() - self.epoch_start[0]  # Training only, not evaluation.
        epoch = done // self.steps_per_epoch
        self.metrics = {  # Every train metric of the step: loss, accuracy, the health norms.
            **{f"train/{k}": sum(m[k] * m["n"] for m in self.logged) / total
               for k in self.logged[0] if k != "n"},
            "train/images_per_second":
                (done - self.epoch_start[1]) * self.config.batch_size / seconds,
            "test/loss": test["loss"], "test/accuracy": test["accuracy"],
            "train/learning_rate": float(self.schedule(done)), "epoch": epoch}
        if self.flops_per_step:
            steps_per_second = self.metrics["train/images_per_second"] / self.config.batch_size
            tflops = steps_per_second * self.flops_per_step / jax.device_count() / 1e12
            self.metrics["train/tflops_per_device"] = tflops
            if self.peak_tflops:
                self.metrics["train/utilization"] = tflops / self.peak_tflops
        logging.info("epoch %d/%d done: train loss %.4f accuracy %.4f | test loss %.4f accuracy "
                     "%.4f | %.0f images/s", epoch, self.config.num_epochs,
                     self.metrics["train/loss"], self.metrics["train/accuracy"], test["loss"],
                     test["accuracy"], self.metrics["train/images_per_second"])
        return self.metrics

