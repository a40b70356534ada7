"""Golden values: the numerics of one training step and the packaged sample, pinned.

Update these numbers only for a change that is meant to change the numerics (a new initialiser,
another loss, another data order) and say so in the commit; a refactor must leave them as they are.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, synthetic_digits

from mnist_flax import input_pipeline, train

# One train_step of configs/default.py from jax.random.key(0) on synthetic_digits(128, 0).
GOLDEN_LOSS = 2.313838005065918
GOLDEN_ACCURACY = 0.0625
GOLDEN_PARAM_ABS_SUM = 15889.990885571335
GOLDEN_PARAM_SUM = -47.142092770969725
# sha256 of the packaged sample's train images, train labels, test images, test labels.
GOLDEN_SAMPLE_SHA256 = "52e08e3f63ac551ea37c240ca8d3e0c6d2c00a3ef1fe617adc6f75ab0b8b5179"


def test_one_train_step_matches_the_golden_values():
    state = train.create_train_state(load_config(), jax.random.key(0))
    images, labels = synthetic_digits(128, 0)
    state, metrics = train.train_step(state, {"image": jnp.asarray(images),
                                              "label": jnp.asarray(labels)})
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(state.params)]
    assert float(metrics["loss"]) == pytest.approx(GOLDEN_LOSS, rel=1e-6)
    assert float(metrics["accuracy"]) == GOLDEN_ACCURACY
    assert sum(np.abs(leaf).sum() for leaf in leaves) == pytest.approx(GOLDEN_PARAM_ABS_SUM,
                                                                       rel=1e-6)
    assert sum(leaf.sum() for leaf in leaves) == pytest.approx(GOLDEN_PARAM_SUM, rel=1e-5)


def test_the_packaged_sample_is_the_golden_one():
    dataset = input_pipeline.load_packaged_sample()
    digest = hashlib.sha256()
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images,
                  dataset.test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert dataset.train_images.shape == (4000, 28, 28, 1)
    assert dataset.test_images.shape == (1000, 28, 28, 1)
    assert digest.hexdigest() == GOLDEN_SAMPLE_SHA256
