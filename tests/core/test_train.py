"""The training step: it lowers the loss, its health norms and FLOPs, determinism, the optimizer,
evaluation. The loop around it: test_loop.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, synthetic_digits

from mnist_flax import input_pipeline, progress, sharding, train
from mnist_flax.fast import dispatch


@pytest.fixture(scope="module")
def config():
    return load_config()


def _batch(n=128, seed=0):
    images, labels = synthetic_digits(n, seed)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def _eval_loss(state, batch):
    mesh = sharding.make_mesh()
    return train.evaluate(state, np.asarray(batch["image"]), np.asarray(batch["label"]), 64,
                          mesh)["loss"]


def test_train_steps_lower_the_loss(config):
    state = train.create_train_state(config, jax.random.key(0))
    batch = _batch()
    before = _eval_loss(state, batch)
    assert abs(before - np.log(10)) < 0.5  # Untrained: close to chance.
    for _ in range(5):
        state, metrics = train.train_step(state, batch)
    assert int(state.step) == 5
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "update_norm", "param_norm"}
    assert all(np.isfinite(float(value)) for value in metrics.values())
    assert _eval_loss(state, batch) < 0.5 * before


def test_the_health_norms_are_those_of_a_plain_gradient_and_update(config):
    """grad_norm: the global norm of plain `jax.grad` on the same batch and dropout mask; the
    update's and the parameters' norms follow from the two states."""
    state = train.create_train_state(config, jax.random.key(0))
    batch = _batch()
    key = jax.random.fold_in(state.dropout_key, state.step)

    def loss(params):
        logits = state.apply_fn({"params": params}, batch["image"].astype(jnp.float32) / 255.0,
                                train=True, rngs={"dropout": key})
        return train.cross_entropy_loss(logits, batch["label"]).mean()

    # Jitted: one compilation, where eagerly each of the backward pass's ops compiled alone; the
    # norms in float64 numpy, on the host.
    grads = jax.device_get(jax.jit(jax.grad(loss))(state.params))
    before = jax.device_get(state.params)  # The step donates the state.
    after, metrics = train.train_step(state, batch)
    after = jax.device_get(after.params)
    update = jax.tree.map(lambda a, b: a - b, after, before)
    assert float(metrics["grad_norm"]) == pytest.approx(_norm(grads), rel=1e-4)
    assert float(metrics["update_norm"]) == pytest.approx(_norm(update), rel=1e-3)
    assert float(metrics["param_norm"]) == pytest.approx(_norm(after), rel=1e-6)


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.float64(x))) for x in jax.tree.leaves(tree))))


def test_the_steps_flops_come_from_xla_and_give_tflops_per_device(config):
    """The tutorial CNN's training step: about 3x its 24 MFLOP forward pass per image; counting
    them traces the step that the first dispatch then runs (a run starts a trace sooner)."""
    mesh = sharding.make_mesh()
    images, labels = synthetic_digits(256, 0)
    dataset = input_pipeline.Dataset(images, labels, images, labels, "synthetic")
    state = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0)))
    traces = []

    def step(state, batch):
        traces.append(batch["image"].shape)
        return train.train_step_fn(state, batch)

    data = dispatch.device_dataset(mesh, dataset)
    flops = dispatch.step_flops(step, state, data, 128)
    assert 60e6 < flops / 128 < 90e6
    order = dispatch.device_epoch_order(mesh, 0, 0, 256)
    dispatch.run(step, state, data, order, num_steps=1, batch_size=128, steps_per_epoch=2,
                 mesh=mesh)
    assert traces == [(128, 28, 28, 1)]
    tracker = progress.Progress(config, 10, 10, train.learning_rate_schedule(config),
                                flops_per_step=flops, peak_tflops=2.0)
    tracker.add({"loss": jnp.float32(0.5), "accuracy": jnp.float32(1.0)}, 10, True)
    metrics = tracker.end_epoch(10, {"loss": 0.5, "accuracy": 1.0})
    expected = (metrics["train/images_per_second"] / 128 * flops / jax.device_count() / 1e12)
    assert metrics["train/tflops_per_device"] == pytest.approx(expected)
    assert metrics["train/utilization"] == pytest.approx(expected / 2.0)


def test_a_non_finite_gradient_norm_stops_as_a_nan_loss_does(config):
    schedule = train.learning_rate_schedule(config)
    tracker = progress.Progress(config, 10, 10, schedule)
    tracker.add({"loss": jnp.float32(0.5), "accuracy": jnp.float32(1.0),
                 "grad_norm": jnp.float32(1.0)}, 1, False)
    with pytest.raises(progress.TrainingDivergedError, match=(
            r"^gradient norm became nan at step 2; stopped without saving it \(the last good "
            r"checkpoint, if any, is kept\); lower --config.learning_rate$")):
        tracker.add({"loss": jnp.float32(0.5), "accuracy": jnp.float32(1.0),
                     "grad_norm": jnp.float32(jnp.nan)}, 2, True)


def test_train_step_is_deterministic_and_dropout_changes_with_step(config):
    batch = _batch()
    state_a = train.create_train_state(config, jax.random.key(0))
    state_b = train.create_train_state(config, jax.random.key(0))
    state_a, metrics_a = train.train_step(state_a, batch)
    state_b, metrics_b = train.train_step(state_b, batch)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # The same params and batch one step later: only the dropout mask differs, and so the loss.
    fresh = train.create_train_state(config, jax.random.key(0))
    _, metrics_next = train.train_step(fresh.replace(step=fresh.step + 1), batch)
    assert float(metrics_next["loss"]) != float(metrics_a["loss"])


def test_default_adam_is_optax_adam_with_keras_values(config):
    """The default is optax.adam with Keras's lr and eps values, and optax's eps placement."""
    state = train.create_train_state(config, jax.random.key(0))
    assert config.adam_eps == 1e-7 and config.learning_rate == 1e-3
    assert config.adam_eps_placement == "optax"
    # optax's first update is -lr * g / (|g| + eps): with g = eps = 1e-7 it is exactly -lr / 2
    # (optax's default eps of 1e-8 would give -lr * 0.91; Keras's rule gives -lr * 0.031, below).
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-7), state.params)
    updates, _ = jax.jit(state.tx.update)(grads, state.opt_state, state.params)
    first = jax.tree.leaves(updates)[0].ravel()[0]
    np.testing.assert_allclose(first, -1e-3 / 2, rtol=1e-4)


def _keras_adam_reference(grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
    """Keras 3's Adam.update_step in float64 numpy: the updates p_t - p_{t-1}, one per gradient."""
    m = v = 0.0
    updates = []
    for t, g in enumerate(grads, start=1):
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        updates.append(-alpha * m / (np.sqrt(v) + eps))
    return updates


def _run_optimizer(placement, grads):
    config = load_config()
    config.adam_eps_placement = placement
    tx = train.create_optimizer(config)
    params = {"w": jnp.zeros(grads[0].shape, jnp.float32)}
    state, updates = tx.init(params), []
    for g in grads:
        u, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        updates.append(np.asarray(u["w"]))
    return updates


def test_keras_placement_follows_keras_update_rule():
    # Gradients from 1e-9 to 1, either sign, changing each step: where eps matters and where not.
    rng = np.random.default_rng(0)
    grads = [rng.choice([-1, 1], 64) * 10.0 ** rng.uniform(-9, 0, 64) for _ in range(6)]
    grads = [np.float64(np.float32(g)) for g in grads]
    expected = _keras_adam_reference(grads)
    for got, want in zip(_run_optimizer("keras", grads), expected, strict=True):
        # float32's rounding, not the rule: 1 - b2^t cancels (0.999 in float32 is 1.3e-5 off in
        # 1 - b2, which Keras and optax both round, in different places); measured 1e-5.
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=1e-12)
    # Pinned by hand at step 1 with g = eps: -lr * s / (s + 1), s = sqrt(1 - b2) (optax: -lr / 2).
    first = _run_optimizer("keras", [np.full(4, 1e-7)])[0]
    s = np.sqrt(1 - 0.999)
    np.testing.assert_allclose(first, -1e-3 * s / (s + 1), rtol=1e-5)
    np.testing.assert_allclose(first, -3.0653e-5, rtol=1e-4)
    # optax's placement is another rule (at step 1 with g = eps, -lr / 2: 16x Keras's update).
    optax_updates = _run_optimizer("optax", grads)
    assert max(np.abs(o - w).max() for o, w in zip(optax_updates, expected, strict=True)) > 1e-4


def test_keras_placement_keeps_the_optimizer_state_tree(config):
    """Checkpoints store opt_state: both placements have optax.adam's tree, shapes and dtypes."""
    keras_config = config.copy_and_resolve_references()
    keras_config.adam_eps_placement = "keras"
    states = [train.create_train_state(c, jax.random.key(0)).opt_state
              for c in (config, keras_config)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(states[0])] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(states[1])]


def test_evaluate_counts_every_image(config):
    """250 images in batches of 100: the last 50 are padded and masked, not dropped."""
    state = train.create_train_state(config, jax.random.key(0))
    images, labels = synthetic_digits(250, 3)
    mesh = sharding.make_mesh()
    result = train.evaluate(state, images, labels, 100, mesh)
    logits = jax.jit(state.apply_fn, static_argnames="train")(
        {"params": state.params}, images.astype(np.float32) / 255, train=False)
    expected_acc = float((np.asarray(logits).argmax(-1) == labels).mean())
    expected_loss = float(train.cross_entropy_loss(logits, jnp.asarray(labels)).mean())
    assert result["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
