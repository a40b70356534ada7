"""The training loop: the data order, k steps per dispatch, device batches, and
`train_and_evaluate` end to end (results, metrics, pictures, checkpoints)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    TIMING_METRICS,
    assert_trees_identical,
    load_config,
    synthetic_digits,
)
from jax.sharding import PartitionSpec as P

from mnist_flax import (
    checkpoints,
    input_pipeline,
    pictures,
    profiling,
    progress,
    sharding,
    summaries,
    train,
)
from mnist_flax.fast import dispatch


@pytest.fixture(scope="module")
def config():
    return load_config()


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = input_pipeline.epoch_permutation(0, 3, 1000)
    np.testing.assert_array_equal(a, input_pipeline.epoch_permutation(0, 3, 1000))
    assert sorted(a) == list(range(1000))
    assert not np.array_equal(a, input_pipeline.epoch_permutation(0, 4, 1000))
    assert not np.array_equal(a, input_pipeline.epoch_permutation(1, 3, 1000))


N, BATCH, K = 256, 32, 3
STEPS_PER_EPOCH = N // BATCH


def _tiny_setup():
    config = load_config()
    config.update(conv_features=(2,), dense_features=4, batch_size=BATCH)
    images, labels = synthetic_digits(N)
    dataset = input_pipeline.Dataset(images, labels, images[:10], labels[:10], "synthetic")
    mesh = sharding.make_mesh()
    return config, dataset, mesh, dispatch.device_dataset(mesh, dataset)


def _fresh(config, mesh):
    return sharding.replicate(mesh, train.create_train_state(config, jax.random.key(0),
                                                             STEPS_PER_EPOCH))


def _copy(state):
    return jax.tree.map(jnp.copy, state)  # train_steps donates its state.


def _state_bits(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), tree)


@pytest.mark.parametrize("first", [0, 3])  # An epoch's start, and a resume in its middle.
def test_k_steps_in_one_dispatch_equal_k_single_steps(first):
    """train_steps(num_steps=K) == K dispatches of one step == K train_step calls on batch_at's
    host batches: the same parameters, optimizer state and metrics, bit for bit."""
    config, dataset, mesh, data = _tiny_setup()
    order = dispatch.device_epoch_order(mesh, config.seed, 0, N)
    kwargs = dict(batch_size=BATCH, steps_per_epoch=STEPS_PER_EPOCH, mesh=mesh)
    start = _fresh(config, mesh)
    for _ in range(first):
        start, _ = dispatch.run(train.train_step_fn, start, data, order, num_steps=1, **kwargs)
    assert int(start.step) == first

    multi, multi_metrics = dispatch.run(train.train_step_fn, _copy(start), data, order,
                                        num_steps=K, **kwargs)
    single, single_metrics = _copy(start), []
    host, host_metrics = _copy(start), []
    for step in range(first, first + K):
        single, metrics = dispatch.run(train.train_step_fn, single, data, order, num_steps=1,
                                       **kwargs)
        single_metrics.append(jax.tree.map(lambda m: m[None], metrics))  # One step: scalars.
        batch = input_pipeline.batch_at(dataset, config.seed, step, BATCH)
        host, metrics = train.train_step(host, sharding.shard_batch(mesh, batch))
        host_metrics.append(jax.tree.map(lambda m: m[None], metrics))
    assert int(multi.step) == first + K
    for other, other_metrics in ((single, single_metrics), (host, host_metrics)):
        assert_trees_identical(_state_bits(multi), _state_bits(other))
        assert_trees_identical(jax.device_get(multi_metrics),
                               jax.tree.map(lambda *m: np.concatenate(m), *other_metrics))


def test_device_batches_are_batch_at(tmp_path):
    """The batch gathered on the device from the device-resident order is the host's batch_at."""
    config, dataset, mesh, data = _tiny_setup()

    @jax.jit
    def gather(data, order, index):
        return input_pipeline.gather_batch(data, order, index, BATCH,
                                           jax.sharding.NamedSharding(mesh, P("batch")))

    for epoch in (0, 1, 5):
        order = dispatch.device_epoch_order(mesh, config.seed, epoch, N)
        for index in (0, 1, STEPS_PER_EPOCH - 1):
            got = jax.device_get(gather(data, order, index))
            want = input_pipeline.batch_at(dataset, config.seed, epoch * STEPS_PER_EPOCH + index,
                                           BATCH)
            assert set(got) == set(want)
            for key in want:
                assert got[key].dtype == want[key].dtype
                np.testing.assert_array_equal(got[key], want[key])


def test_a_dispatch_never_crosses_an_epoch_end_a_log_line_or_a_checkpoint():
    config = load_config()
    config.update(log_every_steps=10, checkpoint_every_steps=7)
    steps_per_epoch, num_steps, step, ends = 24, 48, 0, []
    while step < num_steps:
        n = progress.chunk_steps(step, 16, steps_per_epoch, num_steps, config)
        assert 1 <= n <= 16
        step += n
        ends.append(step)
    boundaries = {24, 48, 10, 20, 30, 40, 7, 14, 21, 28, 35, 42}
    assert boundaries <= set(ends)
    assert progress.chunk_steps(0, 16, 100, 1000, load_config()) == 16  # log_every_steps=100.
    assert progress.chunk_steps(96, 16, 100, 1000, load_config()) == 4


def test_train_and_evaluate_with_3_steps_per_dispatch_equals_1(idx_dir, tmp_path, config):
    config = config.copy_and_resolve_references()
    config.update(data_dir=str(idx_dir), num_epochs=2, batch_size=32, log_every_steps=4,
                  verify_checksums=False, conv_features=(2,), dense_features=4)  # _tiny_setup's.
    results = []
    for k in (1, 3):
        config.steps_per_dispatch = k
        state, metrics = train.train_and_evaluate(config, str(tmp_path / f"k{k}"))
        results.append((_state_bits(state), metrics))
    assert int(results[1][0].step) == 2 * (256 // 32)
    assert_trees_identical(results[0][0], results[1][0])
    for key, value in results[0][1].items():
        if key not in TIMING_METRICS:
            assert results[1][1][key] == value, key


def test_train_and_evaluate_on_small_data(idx_dir, tmp_path, config, capsys):
    config = config.copy_and_resolve_references()
    config.update(data_dir=str(idx_dir), num_epochs=3, batch_size=32, log_every_steps=4,
                  verify_checksums=False)
    state, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 3 * (256 // 32)
    # Metric names are an API (utilisation only where the device's peak is known: not CPUs).
    no_peak = profiling.peak_tflops(jax.devices()[0].device_kind, "float32") is None
    assert set(summaries.SCALAR_TAGS) - ({"train/utilization"} if no_peak else set()) <= set(
        metrics)
    assert metrics["epoch"] == 3
    assert metrics["test/accuracy"] >= 0.9  # The synthetic digits are easy.
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("Test loss: ") and out[-1].startswith("Test accuracy: ")
    assert float(out[-1].split()[-1]) == pytest.approx(metrics["test/accuracy"], abs=1e-4)
    # A bare call (no main around it) gets the end-of-run pictures and checksummed checkpoints.
    assert pictures.drawn(str(tmp_path / "run"), int(state.step))
    with contextlib.closing(checkpoints.create_manager(str(tmp_path / "run"), 1, True)) as m:
        position = m.restore(m.latest_step(), args=ocp.args.Composite(
            position=ocp.args.JsonRestore()))["position"]
    assert checkpoints.CHECKSUM_KEY in position and position["data"]
