"""Adam against Keras 3 itself: the tutorial's model, the same weights and batch, a few steps.

With `adam_eps_placement='keras'` the parameters must match Keras's to float32 precision; with the
default 'optax' placement they must not (the check can tell the two rules apart). Dropout is off so
both sides compute the same gradients. Skipped when keras is not installed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from mnist_flax import input_pipeline, models, train

STEPS = 5
LAYERS = ("Conv_0", "Conv_1", "Dense_0", "Dense_1")  # Keras's layers with weights, in order.
# Float32 agreement: measured 5e-7 (one Conv_1 weight whose first gradients are tiny, so Adam's
# g / (|g| + eps) magnifies float rounding); 0.2% of the largest step (lr = 1e-3).
TOLERANCE = 2e-6


@pytest.fixture
def keras(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # Read once, at import.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # Or keras writes ~/.keras/keras.json.
    keras = pytest.importorskip("keras", reason="keras is not installed")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend")
    return keras


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """128 real digits from the packaged sample (it ships with the package), every class in it."""
    data = input_pipeline.load_packaged_sample()
    idx = np.arange(128) * (len(data.train_labels) // 128)  # The sample is sorted by class.
    return data.train_images[idx], data.train_labels[idx]


def _config(placement: str):
    config = load_config()
    config.dropout_rates = (0.0, 0.0)
    config.adam_eps_placement = placement
    return config


def _train_mnist_flax(placement: str, images, labels) -> tuple[dict, dict]:
    """(initial params, params after STEPS train_steps), as numpy."""
    state = train.create_train_state(_config(placement), jax.random.key(0))
    initial = jax.tree.map(np.asarray, state.params)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    for _ in range(STEPS):
        state, _ = train.train_step(state, batch)
    return initial, jax.tree.map(np.asarray, state.params)


def _train_keras(keras, params: dict, images, labels) -> dict:
    """The tutorial's model and loss in Keras 3, started from `params`, after STEPS Adam steps."""
    config = load_config()
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(input_pipeline.IMAGE_SHAPE),
        layers.Conv2D(32, 3, activation="relu"),
        layers.Conv2D(64, 3, activation="relu"),
        layers.MaxPooling2D(2),
        layers.Dropout(0.0),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.0),
        layers.Dense(10, activation="softmax"),
    ])
    weighted = [layer for layer in model.layers if layer.weights]
    for layer, name in zip(weighted, LAYERS, strict=True):
        # Conv kernels are HWIO and Dense kernels (in, out) on both sides; Flatten is channels-last.
        layer.set_weights([params[name]["kernel"], params[name]["bias"]])
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(
        learning_rate=config.learning_rate, epsilon=config.adam_eps))
    x, y = models.normalize(images), keras.utils.to_categorical(labels, 10)
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    # The variables' values (JAX arrays), not get_weights(): that converts each Keras Variable with
    # np.array(), and its __array__ takes no `copy` (Keras 3.15), which NumPy 2 deprecates.
    return {name: dict(zip(("kernel", "bias"), (np.asarray(w.value) for w in layer.weights),
                           strict=True))
            for layer, name in zip(weighted, LAYERS, strict=True)}


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                          strict=True))


def test_keras_placement_matches_keras_adam_and_optax_placement_does_not(keras):
    images, labels = _batch()
    assert len(set(labels.tolist())) == 10
    initial, keras_rule = _train_mnist_flax("keras", images, labels)
    initial_optax, optax_rule = _train_mnist_flax("optax", images, labels)
    assert _max_abs_diff(initial, initial_optax) == 0.0  # The same start for both placements.
    expected = _train_keras(keras, initial, images, labels)

    assert _max_abs_diff(initial, expected) > 1e-3  # Keras trained: the weights moved.
    assert _max_abs_diff(keras_rule, expected) < TOLERANCE
    # optax's placement is a different update (measured: 6e-3 apart after 5 steps).
    assert _max_abs_diff(optax_rule, expected) > 100 * TOLERANCE
