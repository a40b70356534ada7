"""The Keras tutorial CNN (keras/examples/mnist_cnn.py) as a Linen module, built from a config."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mnist_flax import fast

KERNEL_INITS = ("glorot_uniform", "lecun_normal", "he_normal", "he_uniform", "lecun_uniform")


class CNN(nn.Module):
    """Conv 32 -> Conv 64 -> MaxPool -> Dropout -> Dense 128 -> Dropout -> Dense 10.

    `conv` and `pool` are Linen's unless `fast` swaps in its CPU kernels (the same parameters and
    function). `dtype` is the compute dtype; parameters stay float32.
    """

    conv_features: Sequence[int] = (32, 64)  # One 3x3 VALID conv + relu each, then the pool.
    dense_features: int = 128
    dropout_rates: Sequence[float] = (0.25, 0.5)
    num_classes: int = 10
    kernel_init: str = "glorot_uniform"  # Keras's default; Flax's is lecun_normal.
    dtype: Any = jnp.float32
    conv: Callable[..., nn.Module] = nn.Conv  # Called as nn.Conv and nn.max_pool are, so `fast`'s
    pool: Callable[..., jax.Array] = nn.max_pool  # cover any shape (they fall back to these).

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        init = getattr(nn.initializers, self.kernel_init)()
        # x: (B, 28, 28, 1) in [0, 1].
        for i, features in enumerate(self.conv_features):
            x = self.conv(features, (3, 3), padding="VALID", kernel_init=init, dtype=self.dtype,
                          name=f"Conv_{i}")(x)
            x = nn.relu(x)  # (B, 26, 26, 32), then (B, 24, 24, 64).
        x = self.pool(x, (2, 2), strides=(2, 2))  # (B, 12, 12, 64).
        x = nn.Dropout(self.dropout_rates[0], deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))  # (B, 9216), the order of Keras's channels-last Flatten.
        x = nn.Dense(self.dense_features, kernel_init=init, dtype=self.dtype)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rates[1], deterministic=not train)(x)
        x = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype)(x)
        return x.astype(jnp.float32)  # (B, 10) logits; the loss is always computed in float32.


def create_model(config: ml_collections.ConfigDict) -> CNN:
    return CNN(
        conv_features=tuple(config.conv_features),
        dense_features=config.dense_features,
        dropout_rates=tuple(config.dropout_rates),
        num_classes=config.num_classes,
        kernel_init=config.kernel_init,
        dtype=jnp.dtype(config.compute_dtype),
        **fast.model_layers(config),
    )


def normalize(images):
    """uint8 pixels -> float32 in [0, 1], as the tutorial scales them (works on numpy and jax)."""
    return images.astype("float32") / 255.0


def logits(apply_fn, params: Any, images: jax.Array) -> jax.Array:
    """The inference forward pass (dropout off) on 0-255 images: evaluation, TensorBoard and
    predict all go through it."""
    return apply_fn({"params": params}, normalize(images), train=False)


def probabilities(apply_fn, params: Any, images: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits(apply_fn, params, images))
