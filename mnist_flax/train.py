"""Training and evaluation: TrainState, the jitted steps, and the epoch loop.

One step, from `main` to the optimizer: `train_and_evaluate` builds `TrainState` (params + optax
state + dropout key), feeds `train_step` one global batch at a time (warped first by
`augment_batch` when the config augments), and `train_step` computes the loss and gradients in one
pass and applies optax.adam. Everything the step needs is in the state and the batch, so a run
resumes exactly from a checkpoint of the state (see checkpoints.py).
"""

from __future__ import annotations

import contextlib
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_flax import augment, checkpoints, config_checks, input_pipeline, models, ops, summaries

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    dropout_key: jax.Array  # Per-step dropout keys are fold_in(dropout_key, step): no host rng.
    # Static parts of the recipe that the step reads, like `tx`: not saved in checkpoints.
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    augmentation: augment.RandomAffine = struct.field(pytree_node=False,
                                                      default=augment.RandomAffine())


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf."""


# Bad input, or a run that cannot go on: main and sweep print these as one line, no traceback.
USER_ERRORS = (config_checks.ConfigError, input_pipeline.DataError, checkpoints.CheckpointError,
               TrainingDivergedError)


def create_model(config: ml_collections.ConfigDict) -> models.CNN:
    return models.CNN(
        conv_features=tuple(config.conv_features),
        dense_features=config.dense_features,
        dropout_rates=tuple(config.dropout_rates),
        num_classes=config.num_classes,
        kernel_init=config.kernel_init,
        fast_ops=config.fast_ops,
        dtype=jnp.dtype(config.compute_dtype),
    )


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


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    return optax.adam(learning_rate_schedule(config, steps_per_epoch), eps=config.adam_eps)


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array,
                       steps_per_epoch: int | None = None) -> TrainState:
    """Initialises parameters (Keras's initialisers) and the optimizer from `key`."""
    init_key, dropout_key = jax.random.split(key)
    model = create_model(config)
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
    the 0-255 scale (as float32), so `train_step` scales them as it does uint8 ones. This is a jit
    of its own on purpose: inside `train_step`, XLA fuses the bilinear resampling into the first
    convolution's loops and recomputes it there, which made each CPU step ~30 ms slower; apart,
    it costs ~1 ms (`benchmarks/train_throughput.py --peers=mnist_flax,mnist_flax_augmented`).
    """
    key = jax.random.fold_in(jax.random.fold_in(state.dropout_key, state.step), 1)
    images = augment.random_affine(key, batch["image"].astype(jnp.float32), state.augmentation)
    return {**batch, "image": images}


@functools.partial(ops.jit, donate_argnames="state")  # jax.jit + ops.xla_compiler_options().
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a batch of 0-255 images; metrics come from the same forward pass."""
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    images = input_pipeline.normalize(batch["image"])

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
    """One step as the training loop (and the benchmarks) run it: the warp first, if any."""
    if state.augmentation.enabled:  # Static: the tutorial's run never calls augment_batch.
        batch = augment_batch(state, batch)
    return train_step(state, batch)


@ops.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the batch's real (mask=1) images."""
    logits = state.apply_fn({"params": state.params}, input_pipeline.normalize(batch["image"]),
                            train=False)
    mask = batch["mask"]
    return {
        "loss": (cross_entropy_loss(logits, batch["label"]) * mask).sum(),
        "correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
        "count": mask.sum(),
    }


# ---------------------------------------------------------------------------------------------
# Devices: one mesh axis over every device of every host; the batch is split along it.


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: the compiler propagates the batch sharding through the model (GSPMD), so the
    # model code stays free of sharding annotations.
    return jax.make_mesh((jax.device_count(),), ("batch",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(mesh: jax.sharding.Mesh, global_batch: dict[str, np.ndarray]) -> Batch:
    """Places a global batch (the same numpy arrays on every host) split over all devices.

    Each host contributes only the rows that live on its own devices, so on a pod slice every
    host feeds its shard of the global batch.
    """
    sharding = NamedSharding(mesh, P("batch"))
    n = len(next(iter(global_batch.values())))
    per_host = n // jax.process_count()
    start = jax.process_index() * per_host
    return {
        k: jax.make_array_from_process_local_data(sharding, v[start:start + per_host], v.shape)
        for k, v in global_batch.items()
    }


def replicate(mesh: jax.sharding.Mesh, tree: Any) -> Any:
    """A full copy of `tree` on every device of every host (the parameters, the optimizer state).

    A jitted identity rather than device_put: with several hosts, device_put cannot reach the
    other hosts' devices, while every host running the same jit builds the global array.
    """
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Loss and accuracy over every image: the last batch is padded and masked, never dropped."""
    n = len(labels)
    totals = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        batch = {
            "image": np.pad(images[start:stop], ((0, pad), (0, 0), (0, 0), (0, 0))),
            "label": np.pad(labels[start:stop], (0, pad)),
            "mask": np.pad(np.ones(stop - start, np.float32), (0, pad)),
        }
        totals.append(eval_step(state, shard_batch(mesh, batch)))
    totals = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(totals))
    count = totals["count"]
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch `epoch`: a function of (seed, epoch) alone; a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def host_batch(dataset: input_pipeline.Dataset, order: np.ndarray, index: int,
               batch_size: int) -> dict[str, np.ndarray]:
    """Batch `index` of an epoch whose order is `order`: uint8 images, scaled on the device."""
    idx = order[index * batch_size:(index + 1) * batch_size]
    return {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}


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
    _check_finite([float(loss) for loss in jax.device_get([m["loss"] for m in pending])], step)
    if not bool(all_finite(state.params)):
        raise TrainingDivergedError(
            f"the parameters became NaN or Inf at step {step}; stopped without saving them (the "
            "last good checkpoint, if any, is kept); lower --config.learning_rate"
        )


# ---------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[TrainState, dict[str, float]]:
    """Trains for `config.num_epochs`, evaluating on the test set after every epoch.

    Returns the final state and the final metrics (train/*, test/*), the last line of the log is the
    tutorial's `Test loss:` / `Test accuracy:`.
    """
    dataset = input_pipeline.load_dataset(config)
    logging.info("Data: %s", dataset.describe())
    config_checks.check_fits_data(config, len(dataset.train_labels))
    with contextlib.ExitStack() as hold:  # Releases the workdir lock that _train takes.
        return _train(config, workdir, dataset, hold)


def _train(config: ml_collections.ConfigDict, workdir: str, dataset: input_pipeline.Dataset,
           hold: contextlib.ExitStack) -> tuple[TrainState, dict[str, float]]:
    """The body of `train_and_evaluate`; locks the workdir into `hold` before writing to it."""
    mesh = make_mesh()
    num_train = len(dataset.train_labels)
    batch_size = config.batch_size
    steps_per_epoch = num_train // batch_size  # The partial last batch is dropped; each epoch
    # draws a new order, so every image is still seen.
    num_steps = steps_per_epoch * config.num_epochs

    state = replicate(mesh, create_train_state(config, jax.random.key(config.seed),
                                               steps_per_epoch))
    # Resume from the newest checkpoint, if any: shapes and data order are checked first, and a
    # mismatch raises before anything in the workdir is written.
    position = functools.partial(checkpoints.data_position, steps_per_epoch=steps_per_epoch,
                                 config=config, num_train=num_train)
    state = checkpoints.restore(workdir, state, position(0))
    start_step = int(state.step)
    if start_step:
        logging.info("Resuming from the checkpoint at step %d (epoch %d, step %d of it)",
                     start_step, start_step // steps_per_epoch + 1, start_step % steps_per_epoch)
        for change in checkpoints.config_changes(workdir, config):
            logging.warning("Config changed since the last start: %s", change)
    # Nothing above wrote to the workdir: bad input and a checkpoint that does not fit have failed
    # by now. From here on it is this run's alone; a second run stops with a one-line error.
    hold.enter_context(checkpoints.workdir_lock(workdir))
    checkpoints.write_config(workdir, config)
    manager = checkpoints.create_manager(workdir, config.checkpoint_keep)
    # TensorBoard drops what an interrupted run logged after its checkpoint, but keeps the
    # checkpoint's own step (its epoch-end metrics were logged before it was saved).
    writer = summaries.create_writer(workdir, purge_step=start_step + 1 if start_step else None)
    summaries.write_run_info(writer, config, dataset, state.params)
    summaries.write_model_summary(writer, create_model(config))
    schedule = learning_rate_schedule(config, steps_per_epoch)

    metrics: dict[str, float] = {}
    pending: list[dict[str, jax.Array]] = []  # Train metrics stay on device until logged.
    epoch_train: list[dict[str, float]] = []
    last_log_time, last_log_step = time.perf_counter(), start_step
    epoch_start_time, epoch_start_step = time.perf_counter(), start_step
    images_per_second = 0.0

    # SIGTERM (a preemption) only sets a flag; the step in flight finishes, then we save and stop.
    with checkpoints.SigtermFlag() as sigterm, contextlib.closing(manager):
        for step in range(start_step, num_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 or step == start_step:  # A resumed run may start mid-epoch.
                order = epoch_permutation(config.seed, epoch, num_train)
                epoch_start_time, epoch_start_step = time.perf_counter(), step
                epoch_train = []
            batch = shard_batch(mesh, host_batch(dataset, order, index, batch_size))
            if step + 1 == config.debug_nan_at_step:  # Tests only: this step's loss becomes NaN.
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            state, step_metrics = augment_and_train_step(state, batch)
            pending.append(step_metrics)

            done = step + 1
            end_of_epoch = done % steps_per_epoch == 0
            if done % config.log_every_steps == 0 or end_of_epoch:
                host = jax.device_get(pending)
                pending = []
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                epoch_train.append({**mean, "n": len(host)})
                _check_finite([float(m["loss"]) for m in host], done)
                now = time.perf_counter()
                images_per_second = (done - last_log_step) * batch_size / (now - last_log_time)
                last_log_time, last_log_step = now, done
                eta = (num_steps - done) * batch_size / images_per_second
                logging.info(
                    "epoch %d/%d step %d/%d: loss %.4f accuracy %.4f | %.0f images/s | ETA %s",
                    epoch + 1, config.num_epochs, done, num_steps, mean["loss"], mean["accuracy"],
                    images_per_second, _format_duration(eta),
                )
            if end_of_epoch:
                total = sum(m["n"] for m in epoch_train)
                train = {k: sum(m[k] * m["n"] for m in epoch_train) / total
                         for k in ("loss", "accuracy")}
                epoch_seconds = time.perf_counter() - epoch_start_time  # Training only.
                test = evaluate(state, dataset.test_images, dataset.test_labels,
                                config.eval_batch_size, mesh)
                metrics = {
                    "train/loss": train["loss"], "train/accuracy": train["accuracy"],
                    "test/loss": test["loss"], "test/accuracy": test["accuracy"],
                    "train/learning_rate": float(schedule(done)),
                    "train/images_per_second": (done - epoch_start_step) * batch_size
                    / epoch_seconds,
                    "epoch": epoch + 1,
                }
                summaries.write_scalars(writer, done, metrics)
                logging.info(
                    "epoch %d/%d done: train loss %.4f accuracy %.4f | test loss %.4f accuracy %.4f"
                    " | %.1f s, %.0f images/s",
                    epoch + 1, config.num_epochs, train["loss"], train["accuracy"], test["loss"],
                    test["accuracy"], epoch_seconds, metrics["train/images_per_second"],
                )
            every = config.checkpoint_every_steps
            if end_of_epoch or (every and done % every == 0) or sigterm.is_set():
                check_savable(state, pending, done)
                checkpoints.save(manager, state, position(done))
            if sigterm.is_set():
                checkpoints.log_preempted(done)
                summaries.close(writer)
                raise checkpoints.Preempted(done)
        checkpoints.save(manager, state, position(int(state.step)))  # No-op when already saved.

    if not metrics:  # Nothing left to train (a finished run restarted): evaluate what we have.
        test = evaluate(state, dataset.test_images, dataset.test_labels, config.eval_batch_size,
                        mesh)
        metrics = {"test/loss": test["loss"], "test/accuracy": test["accuracy"]}
    summaries.write_final(writer, state, dataset, config, metrics)
    summaries.close(writer)
    print(f"Test loss: {metrics['test/loss']:.4f}")
    print(f"Test accuracy: {metrics['test/accuracy']:.4f}")
    return state, metrics
