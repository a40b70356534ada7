"""Training: TrainState, the optimizer, the jitted steps, and the loop `train_and_evaluate`.

One step, from `main` to the optimizer: `train_and_evaluate` builds `TrainState` (params + optax
state + dropout key), puts the training data on the devices once and each epoch's order
(`input_pipeline.epoch_permutation`) once per epoch, and `train_steps` runs k steps per dispatch,
each gathering its batch on the device (`input_pipeline.batch_at`'s batch, warped by
`augment_batch` when the config augments) and calling `train_step`, which computes the loss and
gradients in one pass and applies optax.adam. Everything the step needs is in the state, so a run
resumes exactly from a checkpoint of the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from flax.training import train_state
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_flax import (
    augment,
    checkpoints,
    config_checks,
    input_pipeline,
    models,
    ops,
    sharding,
    summaries,
)
from mnist_flax import workdir as workdir_lib

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    dropout_key: jax.Array  # Per-step dropout keys are fold_in(dropout_key, step): no host rng.
    # Static parts of the recipe that the step reads, like `tx`: not saved in checkpoints.
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    augmentation: augment.RandomAffine = struct.field(pytree_node=False,
                                                      default=augment.RandomAffine())


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf."""


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int | None = None) -> optax.Schedule:
    """The step size per step; epochs in the config become steps here, so overrides stay coherent.

    `steps_per_epoch` defaults to full MNIST's; a restored checkpoint needs only the optimizer
    state's structure, which is the same for every schedule.
    """
    if config.lr_schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    steps_per_epoch = steps_per_epoch or input_pipeline.MNIST_SIZES["train"] // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule == "cosine":  # Linear warmup from 0, then cosine decay to 0.
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup_steps,
                                                  total_steps)
    # one_cycle: cosine up from learning_rate/25 over the warmup, cosine down to 1/1e4 of that.
    return optax.cosine_onecycle_schedule(total_steps, config.learning_rate,
                                          pct_start=warmup_steps / total_steps)


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7) -> optax.GradientTransformation:
    """Keras 3's Adam direction: sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).

    Keras adds eps to the square root of the raw second moment v, optax.scale_by_adam to that of
    the bias-corrected v / (1 - b2^t), and optax has no option for Keras's form (eps_root goes
    inside the root). So only that last division is written here: the moments, the step count
    and the state are optax.scale_by_adam's own (the same tree as optax.adam's).
    """
    moments = optax.scale_by_adam(b1, b2, eps=0.0)

    def update_fn(updates, state, params=None):
        _, state = moments.update(updates, state, params)  # jit drops the unused direction.
        t = state.count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: alpha.astype(m.dtype) * m / (jnp.sqrt(v) + eps),
                               state.mu, state.nu)
        return updates, state

    return optax.GradientTransformation(moments.init, update_fn)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """Adam with the config's step size; `adam_eps_placement` says where its epsilon goes."""
    learning_rate = learning_rate_schedule(config, steps_per_epoch)
    if config.adam_eps_placement == "keras":
        return optax.chain(scale_by_keras_adam(eps=config.adam_eps),
                           optax.scale_by_learning_rate(learning_rate))
    return optax.adam(learning_rate, eps=config.adam_eps)


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array,
                       steps_per_epoch: int | None = None) -> TrainState:
    """Initialises parameters (Keras's initialisers) and the optimizer from `key`."""
    init_key, dropout_key = jax.random.split(key)
    model = models.create_model(config)
    dummy = jnp.zeros((1, *input_pipeline.IMAGE_SHAPE), jnp.float32)
    params = jax.jit(functools.partial(model.init, train=False))(init_key, dummy)["params"]
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=create_optimizer(config, steps_per_epoch),
        dropout_key=dropout_key, label_smoothing=config.label_smoothing,
        augmentation=augment.RandomAffine(config.augment_max_shift,
                                          config.augment_max_rotation, config.augment_max_scale),
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Cross-entropy against smoothed targets; 0 is the tutorial's loss, computed the same way."""
    if not label_smoothing:
        return cross_entropy_loss(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


@ops.jit
def augment_batch(state: TrainState, batch: Batch) -> Batch:
    """The batch with each image randomly warped by `state.augmentation`, keyed by the step.

    The key is a function of the state, so a resumed run replays the same images. Pixels stay on
    the 0-255 scale (as float32), so `train_step` scales them as it does uint8 ones. A jit of its
    own on purpose: inside `train_step`, XLA fuses the resampling into the first convolution's
    loops and recomputes it there (README, Speed).
    """
    key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, state.step), 1)
    images = augment.random_affine(key, batch["image"].astype(jnp.float32), state.augmentation)
    return {**batch, "image": images}


@functools.partial(ops.jit, donate_argnames="state")
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a batch of 0-255 images; metrics come from the same forward pass."""
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    images = models.normalize(batch["image"])

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params}, images, train=True, rngs={"dropout": dropout_key}
        )
        return train_loss(logits, batch["label"], state.label_smoothing).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}


def augment_and_train_step(state: TrainState,
                           batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step on a host-fed batch: the warp first, if any (`train_steps` is the loop's)."""
    if state.augmentation.enabled:  # Static: the tutorial's run never calls augment_batch.
        batch = augment_batch(state, batch)
    return train_step(state, batch)


def device_dataset(mesh: jax.sharding.Mesh, dataset: input_pipeline.Dataset) -> Batch:
    """The training split on every device, once (uint8: 47 MB for MNIST); batches come from it."""
    return {"image": sharding.put_replicated(mesh, dataset.train_images),
            "label": sharding.put_replicated(mesh, dataset.train_labels)}


def device_epoch_order(mesh: jax.sharding.Mesh, seed: int, epoch: int, n: int) -> jax.Array:
    """`input_pipeline.epoch_permutation` on every device: 240 kB once per epoch, no per-step work.

    Drawn with numpy as before (1 ms; jax.random.permutation takes 27 ms on CPU), so the data
    order, and with it every existing checkpoint's resume position, is unchanged.
    """
    order = input_pipeline.epoch_permutation(seed, epoch, n).astype(np.int32)
    return sharding.put_replicated(mesh, order)


def _device_batch(state: TrainState, data: Batch, order: jax.Array, batch_size: int,
                  steps_per_epoch: int, mesh: jax.sharding.Mesh | None) -> Batch:
    """The batch of step `state.step`, gathered on the device; warped when the config augments."""
    batch_sharding = NamedSharding(mesh, P("batch")) if mesh is not None else None
    index = state.step % steps_per_epoch
    batch = input_pipeline.gather_batch(data, order, index, batch_size, batch_sharding)
    if state.augmentation.enabled:
        batch = augment_batch.__wrapped__(state, batch)
    return batch


@functools.partial(ops.jit, static_argnames=("batch_size", "steps_per_epoch", "mesh"))
def device_batch(state: TrainState, data: Batch, order: jax.Array, *, batch_size: int,
                 steps_per_epoch: int, mesh: jax.sharding.Mesh | None = None) -> Batch:
    """`_device_batch` in a jit of its own: how the CPU loop warps (see `dispatch_steps`)."""
    return _device_batch(state, data, order, batch_size, steps_per_epoch, mesh)


def dispatch_steps(state: TrainState, data: Batch, order: jax.Array, *, num_steps: int,
                   batch_size: int, steps_per_epoch: int,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[TrainState, dict[str, Any]]:
    """What the loop runs for `num_steps` steps: `train_steps`, except for one augmented step on
    CPU, where the warp keeps a jit of its own (`device_batch`, then `train_step`): in the step's
    jit XLA:CPU still fuses the resampling into the first convolution, 1.5x slower (README,
    Speed). Metrics are (num_steps,) arrays, or scalars from one step."""
    if num_steps == 1 and state.augmentation.enabled and jax.default_backend() == "cpu":
        batch = device_batch(state, data, order, batch_size=batch_size,
                             steps_per_epoch=steps_per_epoch, mesh=mesh)
        return train_step(state, batch)
    return train_steps(state, data, order, num_steps=num_steps, batch_size=batch_size,
                       steps_per_epoch=steps_per_epoch, mesh=mesh)


@functools.partial(ops.jit, donate_argnames="state",
                   static_argnames=("num_steps", "batch_size", "steps_per_epoch", "mesh",
                                    "step_fn"))
def train_steps(state: TrainState, data: Batch, order: jax.Array, *, num_steps: int,
                batch_size: int, steps_per_epoch: int, mesh: jax.sharding.Mesh | None = None,
                step_fn: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """`num_steps` training steps in one dispatch, each on a batch gathered on the device.

    The batch of a step is `input_pipeline.batch_at`'s, taken from `data` (`device_dataset`) in
    the epoch order `order` (`device_epoch_order`) at index `state.step % steps_per_epoch`: the
    position in the data comes from the state alone, so a resumed run replays it. The caller keeps
    the steps inside one epoch. Metrics come back stacked, (num_steps,) each. `num_steps` > 1 runs
    a `lax.scan`; 1 runs the step's own HLO. `step_fn` (default: `train_step`'s function) is
    replaceable, for benchmarks/loop_overhead.py's null step.
    """
    step_fn = step_fn or train_step.__wrapped__  # The plain functions: a nested jit may not
    # carry compiler options.

    def one(state: TrainState, _) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = _device_batch(state, data, order, batch_size, steps_per_epoch, mesh)
        # As augment_batch's own jit did: XLA would otherwise fuse the gather (and the warp) into
        # the first convolution's loops and recompute it there (README, Speed).
        return step_fn(state, lax.optimization_barrier(batch))

    if num_steps == 1:
        state, metrics = one(state, None)
        return state, jax.tree.map(lambda m: m[None], metrics)
    return lax.scan(one, state, length=num_steps)


def steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
    """The config's steps per dispatch; 0 picks per backend: 1 on CPU (XLA:CPU runs the step
    inside a loop ~100x slower, README Speed), 16 on GPU/TPU (host overhead / 16)."""
    if config.steps_per_dispatch:
        return config.steps_per_dispatch
    return 1 if jax.default_backend() == "cpu" else 16


def chunk_steps(step: int, k: int, steps_per_epoch: int, num_steps: int,
                config: ml_collections.ConfigDict) -> int:
    """How many steps the dispatch starting at `step` runs: up to `k`, never past the end of the
    epoch, a log line, a checkpoint, the run, or (tests) the step `debug_nan_at_step` poisons."""
    stops = [num_steps, (step // steps_per_epoch + 1) * steps_per_epoch]
    for every in (config.log_every_steps, config.checkpoint_every_steps):
        if every:
            stops.append((step // every + 1) * every)
    if config.debug_nan_at_step - 1 > step:
        stops.append(config.debug_nan_at_step - 1)
    return min(k, min(stops) - step)


@ops.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the batch's real (mask=1) images."""
    logits = models.logits(state.apply_fn, state.params, batch["image"])
    mask = batch["mask"]
    return {
        "loss": (cross_entropy_loss(logits, batch["label"]) * mask).sum(),
        "correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
        "count": mask.sum(),
    }


@functools.partial(ops.jit, static_argnames="mesh")
def eval_batches(state: TrainState, batches: Batch,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, jax.Array]:
    """`eval_step` over (num_batches, batch_size, ...) arrays in one dispatch: per-batch sums.

    `lax.map` runs the batches one after another, so memory is one batch's (223 MiB for 1,000
    images of the tutorial CNN, 2.2 GiB for 10,000 at once); each batch's rows are split over the
    devices.
    """
    def one(batch: Batch) -> dict[str, jax.Array]:
        if mesh is not None:
            batch = lax.with_sharding_constraint(batch, NamedSharding(mesh, P("batch")))
        return eval_step.__wrapped__(state, batch)

    return lax.map(one, batches)


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Loss and accuracy over every image, in one dispatch of `batch_size`-image batches: the
    last batch is padded and masked, never dropped."""
    n = len(labels)
    pad = -n % batch_size
    batches = {
        "image": np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
        "label": np.pad(labels, (0, pad)),
        "mask": np.pad(np.ones(n, np.float32), (0, pad)),
    }
    batches = {k: sharding.put_replicated(mesh, v.reshape(-1, batch_size, *v.shape[1:]))
               for k, v in batches.items()}
    totals = jax.device_get(eval_batches(state, batches, mesh))
    totals = {k: float(np.sum(list(v))) for k, v in totals.items()}
    count = totals["count"]
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}


@jax.jit
def _probabilities(state: TrainState, images: jax.Array) -> jax.Array:
    return models.probabilities(state.apply_fn, state.params, images)


def predict_probabilities(state: TrainState, images: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """(N, classes) probabilities for uint8 images, `batch_size` at a time (for TensorBoard)."""
    return np.concatenate([np.asarray(_probabilities(state, images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s")


def _check_finite(losses: list[float], last_step: int) -> None:
    """Raises on the first NaN/Inf among the per-step `losses` of the steps up to `last_step`."""
    for offset, loss in enumerate(losses):
        if not math.isfinite(loss):
            step = last_step - len(losses) + 1 + offset
            raise TrainingDivergedError(
                f"training loss became {loss} at step {step}; stopped without saving it (the last "
                "good checkpoint, if any, is kept); lower --config.learning_rate"
            )


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_savable(state: TrainState, pending: list[dict[str, jax.Array]], step: int) -> None:
    """Refuses to checkpoint a diverged state, which would push the last good checkpoint out.

    Progress lines check the loss only every `log_every_steps`; this checks the steps since the
    last one and every parameter (a finite loss can still give NaN gradients), for a few ms a save.
    """
    losses = jax.device_get([m["loss"] for m in pending])  # Scalars, or (k,) per dispatch.
    _check_finite([float(loss) for chunk in losses for loss in np.ravel(chunk)], step)
    if not bool(all_finite(state.params)):
        raise TrainingDivergedError(
            f"the parameters became NaN or Inf at step {step}; stopped without saving them (the "
            "last good checkpoint, if any, is kept); lower --config.learning_rate"
        )


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Progress:
    """Train metrics kept on device until a log line; the epoch's averages and speed."""

    config: ml_collections.ConfigDict
    num_steps: int
    pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    logged: list[dict[str, float]] = dataclasses.field(default_factory=list)  # This epoch's.
    last_log: tuple[float, int] = (0.0, 0)  # (time, step) of the last log line.
    epoch_start: tuple[float, int] = (0.0, 0)

    def start_epoch(self, step: int) -> None:
        self.logged = []
        self.last_log = self.epoch_start = (time.perf_counter(), step)

    def add(self, step_metrics: dict[str, jax.Array], done: int, epoch: int,
            end_of_epoch: bool) -> None:
        """Keeps one dispatch's metrics ((k,) each); every log_every_steps (and at epoch end)
        logs a line."""
        self.pending.append(step_metrics)
        if done % self.config.log_every_steps and not end_of_epoch:
            return
        host, self.pending = jax.device_get(self.pending), []
        per_step = {k: np.concatenate([np.ravel(m[k]) for m in host]) for k in host[0]}
        _check_finite([float(loss) for loss in per_step["loss"]], done)
        mean = {k: float(np.mean(v)) for k, v in per_step.items()}
        self.logged.append({**mean, "n": len(per_step["loss"])})
        now, (then, last_step) = time.perf_counter(), self.last_log
        images_per_second = (done - last_step) * self.config.batch_size / (now - then)
        self.last_log = (now, done)
        eta = (self.num_steps - done) * self.config.batch_size / images_per_second
        logging.info("epoch %d/%d step %d/%d: loss %.4f accuracy %.4f | %.0f images/s | ETA %s",
                     epoch + 1, self.config.num_epochs, done, self.num_steps, mean["loss"],
                     mean["accuracy"], images_per_second, _format_duration(eta))

    def epoch_train_metrics(self, done: int) -> dict[str, float]:
        total = sum(m["n"] for m in self.logged)
        seconds = time.perf_counter() - self.epoch_start[0]  # Training only, not evaluation.
        return {"train/loss": sum(m["loss"] * m["n"] for m in self.logged) / total,
                "train/accuracy": sum(m["accuracy"] * m["n"] for m in self.logged) / total,
                "train/images_per_second":
                    (done - self.epoch_start[1]) * self.config.batch_size / seconds}


def _end_of_epoch(state: TrainState, progress: _Progress, done: int, epoch: int,
                  dataset: input_pipeline.Dataset, mesh: jax.sharding.Mesh,
                  schedule: optax.Schedule, writer: Any) -> dict[str, float]:
    """Evaluates on the test set, logs the epoch's line and writes its scalars."""
    config = progress.config
    train_metrics = progress.epoch_train_metrics(done)
    test = evaluate(state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh)
    metrics = {**train_metrics, "test/loss": test["loss"], "test/accuracy": test["accuracy"],
               "train/learning_rate": float(schedule(done)), "epoch": epoch + 1}
    summaries.write_scalars(writer, done, metrics)
    logging.info("epoch %d/%d done: train loss %.4f accuracy %.4f | test loss %.4f accuracy %.4f"
                 " | %.0f images/s", epoch + 1, config.num_epochs, metrics["train/loss"],
                 metrics["train/accuracy"], test["loss"], test["accuracy"],
                 metrics["train/images_per_second"])
    return metrics


_CACHE_LISTENING: list[bool] = []  # Registered once, on the first run's first dispatch.
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}


def _count_cache_event(event: str, **kwargs) -> None:
    if event in _CACHE_EVENTS:
        _CACHE_EVENTS[event] += 1


@contextlib.contextmanager
def _compile_cache_log(first_dispatch: bool):
    """Around the first training dispatch: logs whether the step was compiled or loaded from JAX's
    persistent compilation cache (`cli.enable_compilation_cache`)."""
    if not first_dispatch:
        yield
        return
    if not _CACHE_LISTENING:
        jax.monitoring.register_event_listener(_count_cache_event)
        _CACHE_LISTENING.append(True)
    before, start = dict(_CACHE_EVENTS), time.perf_counter()
    yield
    hits, misses = (_CACHE_EVENTS[e] - before[e] for e in _CACHE_EVENTS)
    cache_dir = jax.config.jax_compilation_cache_dir
    if not hits and not misses and cache_dir:
        logging.info("Training step: already compiled in this process")
    elif hits and not misses:
        logging.info("Training step: compile-cache hit, loaded from %s in %.2f s (not "
                     "recompiled)", cache_dir, time.perf_counter() - start)
    else:
        logging.info("Training step: compiled in %.2f s (persistent compilation cache: %s)",
                     time.perf_counter() - start, f"miss, saved to {cache_dir}" if cache_dir
                     else "off")


def _restore(workdir: str, state: TrainState, position: dict[str, int],
             config: ml_collections.ConfigDict) -> tuple[TrainState, list[tuple[int, str]]]:
    """The newest intact checkpoint's state (or `state`) and the damaged (step, reason) pairs
    skipped on the way; reads only, and logs what it resumes."""
    state, damaged = checkpoints.restore_intact(workdir, state, position)
    step, steps_per_epoch = int(state.step), position["steps_per_epoch"]
    if step >= steps_per_epoch * config.num_epochs:
        logging.info("The checkpoint at step %d has finished all %d epochs: nothing to train",
                     step, config.num_epochs)
    elif step:
        logging.info("Resuming from the checkpoint at step %d (epoch %d, step %d of it)",
                     step, step // steps_per_epoch + 1, step % steps_per_epoch)
    if step:
        try:
            changes = workdir_lib.config_changes(workdir, config)
        except workdir_lib.WorkdirError as e:  # Damaged: only this log line needs it.
            changes = [f"unknown ({e}); it is rewritten now"]
        for change in changes:
            logging.warning("Config changed since the last start: %s", change)
    return state, damaged


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    lease_seconds: float = workdir_lib.LEASE_TTL_S,
) -> tuple[TrainState, dict[str, float]]:
    """Trains for `config.num_epochs`, evaluating on the test set after every epoch.

    Returns the final state and metrics (train/*, test/*); the last lines printed are the
    tutorial's `Test loss:` / `Test accuracy:`.
    """
    dataset = input_pipeline.load_dataset(config)
    logging.info("Data: %s", dataset.describe())
    num_train = len(dataset.train_labels)
    config_checks.check_fits_data(config, num_train)
    mesh = sharding.make_mesh()
    steps_per_epoch = num_train // config.batch_size
    num_steps = steps_per_epoch * config.num_epochs
    position = functools.partial(checkpoints.data_position, steps_per_epoch=steps_per_epoch,
                                 config=config, num_train=num_train)
    state = sharding.replicate(mesh, create_train_state(config, jax.random.key(config.seed),
                                                        steps_per_epoch))
    # Every process must see the workdir process 0 writes (a pod's hosts share no disk).
    workdir_lib.check_shared(workdir)
    # Shapes and data order are checked before anything in the workdir is written.
    state, damaged = _restore(workdir, state, position(0), config)
    start_step = int(state.step)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    progress = _Progress(config, num_steps)
    metrics: dict[str, float] = {}
    # From here on the workdir is this run's alone: a second run stops with a one-line error.
    # SIGTERM (a preemption) and Ctrl-C only set a flag; the step in flight finishes, then we
    # save and stop. Damaged checkpoints that the restore skipped are moved aside, not deleted.
    with (workdir_lib.lock(workdir, lease_seconds) as held, workdir_lib.StopFlag() as stop,
          contextlib.closing(checkpoints.create_manager(
              workdir, config.checkpoint_keep, set_aside=damaged)) as manager,
          summaries.open_writer(workdir, start_step) as writer):
        workdir_lib.write_config(workdir, config)
        summaries.write_run_info(writer, config, dataset, state.params)
        summaries.write_model_summary(writer, models.create_model(config))
        # The data lives on the devices; per dispatch the host sends only the state's handles.
        data, order, order_epoch = device_dataset(mesh, dataset), None, None
        k, step = steps_per_dispatch(config), start_step
        while step < num_steps:
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 or step == start_step:  # A resumed run may start mid-epoch.
                progress.start_epoch(step)
            if order_epoch != epoch:
                order, order_epoch = device_epoch_order(mesh, config.seed, epoch, num_train), epoch
            if step + 1 == config.debug_nan_at_step:  # Tests only: this step's loss becomes NaN.
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            n = chunk_steps(step, k, steps_per_epoch, num_steps, config)
            with _compile_cache_log(step == start_step):
                state, step_metrics = dispatch_steps(
                    state, data, order, num_steps=n, batch_size=config.batch_size,
                    steps_per_epoch=steps_per_epoch, mesh=mesh)
            done, end_of_epoch = step + n, index + n == steps_per_epoch
            step = done
            progress.add(step_metrics, done, epoch, end_of_epoch)
            if end_of_epoch:
                metrics = _end_of_epoch(state, progress, done, epoch, dataset, mesh, schedule,
                                        writer)
            every, stopping = config.checkpoint_every_steps, stop.agreed()
            if end_of_epoch or (every and done % every == 0) or stopping:
                check_savable(state, progress.pending, done)
                held.check()  # A run that lost its gs:// lease must not save over another's.
                checkpoints.save(manager, state, position(done))
            if stopping:
                workdir_lib.log_preempted(done, stop.signum)
                raise workdir_lib.Preempted(done, stop.signum)
        held.check()
        checkpoints.save(manager, state, position(int(state.step)))  # No-op when already saved.
        if not metrics:  # Nothing left to train (a finished run restarted): evaluate what we have.
            test = evaluate(state, dataset.test_images, dataset.test_labels,
                            config.eval_batch_size, mesh)
            metrics = {"test/loss": test["loss"], "test/accuracy": test["accuracy"]}
        if start_step < num_steps:  # A finished run restarted already has its final summaries.
            probabilities = predict_probabilities(state, dataset.test_images,
                                                  config.eval_batch_size)
            summaries.write_final(writer, int(state.step), dataset, probabilities,
                                  config.num_classes)
    print(f"Test loss: {metrics['test/loss']:.4f}")
    print(f"Test accuracy: {metrics['test/accuracy']:.4f}")
    return state, metrics
