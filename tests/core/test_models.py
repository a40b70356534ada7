"""The CNN: the tutorial's parameter count, shapes, initialisers, and the fast path's equality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_flax import models
from mnist_flax.fast import INIT_OPTIONS, ops


def _params(model, seed=0):
    """As train.create_train_state initialises: one jit, compiled with fast.INIT_OPTIONS (run
    eagerly, each parameter's random bits were a compilation of their own)."""
    init = jax.jit(functools.partial(model.init, train=False), compiler_options=INIT_OPTIONS)
    return init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def test_parameter_count_matches_the_keras_tutorial():
    params = _params(models.CNN())
    assert sum(p.size for p in jax.tree.leaves(params)) == 1_199_882


def test_layer_shapes():
    params = _params(models.CNN())
    shapes = jax.tree.map(lambda p: p.shape, params)
    assert shapes == {
        "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (9216, 128), "bias": (128,)},
        "Dense_1": {"kernel": (128, 10), "bias": (10,)},
    }


def test_keras_initialisers_glorot_uniform_and_zero_bias():
    params = _params(models.CNN())
    kernel = params["Dense_0"]["kernel"]
    limit = np.sqrt(6 / (9216 + 128))  # glorot_uniform's bound for fan_in + fan_out.
    assert float(jnp.abs(kernel).max()) <= limit
    assert float(jnp.abs(kernel).max()) > 0.9 * limit  # Uniform, not normal: fills the range.
    assert all(float(jnp.abs(p["bias"]).max()) == 0 for p in params.values())


@pytest.mark.parametrize("conv_features, pooled_side", [((8, 16), 12), ((8, 8, 16), 11)])
def test_configurable_widths_depth_and_classes(conv_features, pooled_side):
    model = models.CNN(conv_features=conv_features, dense_features=32, num_classes=3)
    params = _params(model)
    assert [params[f"Conv_{i}"]["kernel"].shape[-1] for i in range(len(conv_features))] == list(
        conv_features)
    # Each 3x3 VALID convolution trims 2 pixels; the 2x2 pool halves what is left.
    assert params["Dense_0"]["kernel"].shape == (pooled_side ** 2 * conv_features[-1], 32)
    logits = model.apply({"params": params}, jnp.zeros((5, 28, 28, 1)), train=False)
    assert logits.shape == (5, 3) and logits.dtype == jnp.float32


@pytest.mark.parametrize("train", [False, True])
def test_fast_ops_compute_the_same_function_and_gradients(train):
    """fast.ops' layers are a faster implementation, not another model: same tree, values,
    grads (`fast.model_layers` picks them on CPU)."""
    fast, plain = models.CNN(conv=ops.Conv3x3, pool=ops.max_pool), models.CNN()
    params = _params(fast, seed=1)
    assert jax.tree.structure(params) == jax.tree.structure(_params(plain))
    images = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
    labels = jnp.array([0, 3, 7, 9])
    rngs = {"dropout": jax.random.key(3)}

    def loss(model, p):
        logits = model.apply({"params": p}, images, train=train, rngs=rngs)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

    # Jitted, as training runs them: one compilation each, not one per op.
    (loss_fast, grads_fast) = jax.jit(jax.value_and_grad(lambda p: loss(fast, p)))(params)
    (loss_plain, grads_plain) = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    np.testing.assert_allclose(loss_fast, loss_plain, rtol=1e-5)
    for g_fast, g_plain in zip(jax.tree.leaves(grads_fast), jax.tree.leaves(grads_plain),
                               strict=True):
        np.testing.assert_allclose(g_fast, g_plain, rtol=2e-4, atol=2e-6)
