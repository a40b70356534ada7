"""Training: TrainState, the optimizer, `train_step`, evaluation and the loop `train_and_evaluate`.

One step: the loop runs `train_step` on the batch of `state.step` (`fast.dispatch` gathers it on
the device): one forward pass gives the loss, gradients and metrics, then `apply_gradients` is the
optax.adam update. The state holds all the step needs, so a run resumes exactly from a checkpoint.
`hooks.Hooks` are what main's operations (`run.Operations`) add; the defaults train bare.
"""

import functools

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
    configs,
    fast,
    input_pipeline,
    models,
    profiling,
    sharding,
    summaries,
)
from mnist_flax import hooks as hooks_lib
from mnist_flax import progress as progress_lib
from mnist_flax.fast import dispatch

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    dropout_key: jax.Array  # Per-step dropout keys are fold_in(dropout_key, step): no host rng.
    # Static parts of the recipe that the step reads, like `tx`: not saved in checkpoints.
    label_smoothing: float = struct.field(pytree_node=False, default=0.0)
    augmentation: augment.RandomAffine = struct.field(pytree_node=False,
                                                      default=augment.RandomAffine())


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int | None = None) -> optax.Schedule:
    """The step size per step; epochs in the config become steps here, so overrides stay coherent
    (`steps_per_epoch` defaults to full MNIST's)."""
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
    """Keras 3's Adam direction, sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps): eps on the root
    of the raw second moment (optax: of the bias-corrected one); the state is scale_by_adam's."""
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
    init = jax.jit(functools.partial(model.init, train=False), compiler_options=fast.INIT_OPTIONS)
    params = init(init_key, jnp.zeros((1, *input_pipeline.IMAGE_SHAPE), jnp.float32))["params"]
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=create_optimizer(config, steps_per_epoch),
        dropout_key=dropout_key, label_smoothing=config.label_smoothing,
        augmentation=augment.RandomAffine(config.augment_max_shift,
                                          config.augment_max_rotation, config.augment_max_scale))


cross_entropy_loss = optax.softmax_cross_entropy_with_integer_labels


def train_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Cross-entropy against smoothed targets; 0 is the tutorial's loss, computed the same way."""
    if not label_smoothing:
        return cross_entropy_loss(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on a batch of 0-255 images; metrics come from the same forward pass, and the
    training-health norms (gradients, update, parameters after it) from the same step."""
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    images = models.normalize(batch["image"])

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images, train=True,
                                rngs={"dropout": dropout_key})
        return train_loss(logits, batch["label"], state.label_smoothing).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)  # apply_gradients,
    params = optax.apply_updates(state.params, updates)  # with the update kept for its norm.
    metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
               "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "param_norm": optax.tree.norm(params)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# The plain function is what `fast.dispatch` runs, k per dispatch; this is the step on a batch.
train_step = jax.jit(train_step_fn, donate_argnames="state", compiler_options=fast.COMPILER_OPTIONS)


def _eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the batch's real (mask=1) images."""
    logits = models.logits(state.apply_fn, state.params, batch["image"])
    mask = batch["mask"]
    return {"loss": (cross_entropy_loss(logits, batch["label"]) * mask).sum(),
            "correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(), "count": mask.sum()}


@functools.partial(jax.jit, static_argnames="mesh", compiler_options=fast.COMPILER_OPTIONS)
def eval_batches(state: TrainState, batches: Batch,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, jax.Array]:
    """The eval step over (num_batches, batch_size, ...) arrays in one dispatch, a batch at a
    time (memory of one batch), each batch's rows split over the devices."""
    def one(batch: Batch) -> dict[str, jax.Array]:
        if mesh is not None:
            batch = lax.with_sharding_constraint(batch, NamedSharding(mesh, P("batch")))
        return _eval_step(state, batch)

    return lax.map(one, batches)


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Loss and accuracy over every image; the last batch is padded and masked, never dropped.
    A batch larger than the images is cut to them (rounded up to the devices): padding it
    whole would only cost memory."""
    batch_size = min(batch_size, -(-len(labels) // mesh.size) * mesh.size)
    pad = -len(labels) % batch_size
    batches = {k: sharding.put_replicated(mesh, np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
                                          .reshape(-1, batch_size, *v.shape[1:]))
               for k, v in (("image", images), ("label", labels),
                            ("mask", np.ones(len(labels), np.float32)))}
    totals = {k: float(np.sum(v)) for k, v in jax.device_get(eval_batches(state, batches,
                                                                          mesh)).items()}
    return {"loss": totals["loss"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: hooks_lib.Hooks | None = None,
                       dataset: input_pipeline.Dataset | None = None,
                       ) -> tuple[TrainState, dict[str, float]]:
    """Trains for `config.num_epochs`, testing after every epoch; checkpoints and TensorBoard
    events go to `workdir`, and the same call resumes from them. Returns the state and the last
    metrics; prints the tutorial's `Test loss:` / `Test accuracy:` (unless `hooks` stopped it).
    `dataset`: the config's data, if the caller loaded it."""
    hooks = hooks or hooks_lib.Hooks()
    dataset = dataset or input_pipeline.load_dataset(config)
    logging.info("Data: %s", dataset.describe())
    configs.check_against_data(config, dataset.train_labels)
    num_train, mesh = len(dataset.train_labels), sharding.make_mesh()
    steps_per_epoch = num_train // config.batch_size
    num_steps = steps_per_epoch * config.num_epochs
    fingerprint = dataset.fingerprint()  # Not checked on restore if the config says so.
    position = functools.partial(checkpoints.data_position, steps_per_epoch=steps_per_epoch,
                                 config=config, num_train=num_train, data=fingerprint)
    state = sharding.replicate(mesh, create_train_state(config, jax.random.key(config.seed),
                                                        steps_per_epoch))
    state = hooks.restore(workdir, state, position(0, data="" if config.resume_on_other_data
                                                  else fingerprint))
    start_step = step = int(state.step)
    data = dispatch.device_dataset(mesh, dataset)
    progress = progress_lib.Progress(
        config, num_steps, steps_per_epoch, learning_rate_schedule(config, steps_per_epoch), step,
        dispatch.step_flops(train_step_fn, state, data, config.batch_size),
        profiling.peak_tflops(jax.devices()[0].device_kind, config.compute_dtype))
    with (checkpoints.open_manager(workdir, config.checkpoint_keep) as manager,
          summaries.open_writers(workdir, start_step) as writers,
          profiling.StepProfile(workdir, config.profile_steps, start_step) as profile):
        checkpoints.write_config(workdir, config)
        summaries.write_run_info(writers, config, dataset, models.create_model(config),
                                 state.params)
        k = fast.steps_per_dispatch(config)
        while step < num_steps:
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 or step == start_step:  # A resumed run may start mid-epoch.
                progress.start_epoch(step)
                order = dispatch.device_epoch_order(mesh, config.seed, epoch, num_train)
            n = progress_lib.chunk_steps(step, k, steps_per_epoch, num_steps, config)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = dispatch.run(
                    train_step_fn, state, data, order, num_steps=n, batch_size=config.batch_size,
                    steps_per_epoch=steps_per_epoch, mesh=mesh)
            step, end_of_epoch = step + n, index + n == steps_per_epoch
            profile.after_dispatch(step, step_metrics)
            progress.add(step_metrics, step, end_of_epoch)
            if end_of_epoch:
                test = evaluate(state, dataset.test_images, dataset.test_labels,
                                config.eval_batch_size, mesh)
                summaries.write_scalars(writers, step, progress.end_epoch(step, test))
            stopping = step < num_steps and hooks.should_stop(step)
            every = config.checkpoint_every_steps
            if end_of_epoch or (every and step % every == 0) or stopping:
                progress.check_savable(state, step)
                hooks.before_save(step)
                checkpoints.save(manager, state, position(step))
            if stopping:
                return state, progress.metrics
        # The pictures; a finished run started again draws them if a stop or kill prevented it.
        if writers is not None:
            from mnist_flax import pictures  # PIL and TensorBoard's reader: at the end only.

            if start_step < num_steps or not pictures.drawn(workdir, step):
                pictures.write_pictures(writers, state, dataset, config)
    metrics = progress.metrics or {f"test/{k}": v for k, v in evaluate(  # A finished run.
        state, dataset.test_images, dataset.test_labels, config.eval_batch_size, mesh).items()}
    print(f"Test loss: {metrics['test/loss']:.4f}")
    print(f"Test accuracy: {metrics['test/accuracy']:.4f}")
    return state, metrics
