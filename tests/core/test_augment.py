"""mnist_flax.augment: the warp is the transform it claims; training uses it reproducibly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL, load_config

from mnist_flax import augment, input_pipeline, sharding, train
from mnist_flax.fast import dispatch

# Jitted: one compilation each, where eagerly each of the warp's ops compiled alone.
random_affine = jax.jit(augment.random_affine, static_argnames="spec")
warp = jax.jit(augment.warp)
affine_matrices = jax.jit(augment.affine_matrices, static_argnames=("n", "spec"))
augment_batch = jax.jit(dispatch.augment_batch)


@pytest.fixture
def images() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).random((3, 28, 28, 1)), jnp.float32)


def _matrices(linear: np.ndarray, shift: np.ndarray, n: int = 3) -> jax.Array:
    """Inverse maps (output -> input) for a forward transform x -> linear @ x + shift."""
    inverse = np.linalg.inv(linear)
    return jnp.asarray(np.concatenate([inverse, (-inverse @ shift)[:, None]], -1)[None]
                       .repeat(n, 0), jnp.float32)


def test_zero_ranges_are_the_identity(images):
    spec = augment.RandomAffine()
    assert not spec.enabled
    out = random_affine(jax.random.key(0), images, spec)
    np.testing.assert_array_equal(out, images)


def test_integer_shift_moves_pixels_and_fills_zeros(images):
    out = warp(images, _matrices(np.eye(2), np.array([2.0, -1.0])))
    expected = np.zeros_like(images)
    expected[:, 2:, :-1] = np.asarray(images)[:, :-2, 1:]  # Down 2 rows, left 1 column.
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_quarter_turn_is_rot90_about_the_centre(images):
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])
    out = warp(images, _matrices(quarter, np.zeros(2)))
    np.testing.assert_allclose(out, np.rot90(np.asarray(images), 1, axes=(1, 2)), atol=1e-5)


def test_draws_stay_in_range_and_depend_only_on_the_key():
    spec = augment.RandomAffine(max_shift=2.0, max_rotation=0.0, max_scale=0.0)
    m = affine_matrices(jax.random.key(3), 1000, spec)
    np.testing.assert_allclose(m[:, :, :2], np.broadcast_to(np.eye(2), (1000, 2, 2)), atol=1e-6)
    assert np.abs(m[:, :, 2]).max() <= 2.0 and np.abs(m[:, :, 2]).max() > 1.9
    np.testing.assert_array_equal(m, affine_matrices(jax.random.key(3), 1000, spec))
    assert not np.array_equal(m, affine_matrices(jax.random.key(4), 1000, spec))
    spec = augment.RandomAffine(max_rotation=15.0, max_scale=0.1)
    m = np.asarray(affine_matrices(jax.random.key(5), 1000, spec))
    scale = 1 / np.sqrt(np.linalg.det(m[:, :, :2]))
    angle = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0]))
    assert 0.9 - 1e-5 <= scale.min() < 0.92 and 1.08 < scale.max() <= 1.1 + 1e-5
    assert 14 < np.abs(angle).max() <= 15 + 1e-4


def _batch(n: int = 16) -> dict[str, jax.Array]:
    rng = np.random.default_rng(1)
    return {"image": jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), np.uint8)),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _augmented_config():
    config = load_config("default")
    config.augment_max_rotation = 15.0
    config.augment_max_shift = 2.0
    return config


def test_augment_batch_warps_images_reproducibly_per_step():
    state = train.create_train_state(_augmented_config(), jax.random.key(0))
    batch = _batch()
    out = augment_batch(state, batch)
    np.testing.assert_array_equal(out["label"], batch["label"])
    assert out["image"].dtype == jnp.float32 and out["image"].shape == batch["image"].shape
    assert float(out["image"].max()) > 200  # Still the 0-255 scale train_step expects.
    assert not np.allclose(out["image"], batch["image"])  # The digits moved.
    # Same state and step -> the same warp (a resumed run replays it); the next step, another.
    np.testing.assert_array_equal(out["image"], augment_batch(state, batch)["image"])
    later = augment_batch(state.replace(step=state.step + 1), batch)
    assert not np.allclose(later["image"], out["image"])


def test_zero_shift_rotation_and_scale_leave_pixels_in_place():
    config = load_config("default")
    config.augment_max_scale = 1e-9  # Enabled, but every draw is (almost) the identity.
    state = train.create_train_state(config, jax.random.key(0))
    batch = _batch()
    np.testing.assert_allclose(augment_batch(state, batch)["image"], batch["image"],
                               atol=1e-3)


@pytest.mark.parametrize("augmented", [False, True])
def test_the_training_loop_augments_every_step_only_when_asked(augmented, idx_dir, tmp_path):
    """The loop (device-resident data, the warp inside its dispatch) trains on exactly the batches
    `train_step` sees when fed `batch_at`'s host batches, warped first (`augment_batch`) when
    asked, not otherwise."""
    config = _augmented_config() if augmented else load_config("default")
    config.update(TINY_MODEL)  # The warp and the batches do not depend on the model.
    config.update(data_dir=str(idx_dir), num_epochs=1, batch_size=64, verify_checksums=False)
    state, _ = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 256 // 64

    dataset = input_pipeline.load_dataset(config)
    mesh = sharding.make_mesh()
    expected = sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0), 4))
    for step in range(4):
        batch = sharding.shard_batch(mesh, input_pipeline.batch_at(dataset, config.seed, step,
                                                                   config.batch_size))
        if augmented:  # On the loop's sharding of the batch, so the step compiled for it runs.
            batch = sharding.shard_batch(mesh, augment_batch(expected, batch))
        expected, _ = train.train_step(expected, batch)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
