"""mnist_flax.fast.ops against the plain lax / flax reference: values, gradients, odd shapes,
bf16."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import textwrap

import conftest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mnist_flax import fast
from mnist_flax.fast import ops
from mnist_flax.run import process

DN = ("NHWC", "HWIO", "NHWC")
XLA_DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}  # LLVM's -O3, what users compile with.


def ref_conv(x, kernel, bias):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=DN,
                                    precision=lax.Precision.HIGHEST) + bias


def rand(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


CONV_SHAPES = [
    # (batch, height, width, in_channels, out_channels)
    (4, 28, 28, 1, 32),   # MNIST conv 1: the 9-tap path
    (4, 26, 26, 32, 64),  # MNIST conv 2: the convolution path
    (3, 9, 7, 5, 6),      # odd everything, convolution path
    (3, 8, 11, 3, 4),     # odd, 9-tap path with several channels
    (1, 3, 3, 2, 1),      # a single output pixel
]


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("jit", [False, True])
def test_conv2d_matches_lax(shape, jit):
    b, h, w, cin, cout = shape
    x, k, bias = rand(0, b, h, w, cin), rand(1, 3, 3, cin, cout, scale=0.3), rand(2, cout)
    dy = rand(3, b, h - 2, w - 2, cout)
    f = jax.jit(ops.conv2d) if jit else ops.conv2d
    y, vjp = jax.vjp(f, x, k, bias)
    y_ref, vjp_ref = jax.vjp(ref_conv, x, k, bias)
    assert y.dtype == jnp.float32
    assert_close(y, y_ref, 1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, 1e-5)


def test_conv2d_equals_flax_conv():
    x = rand(0, 3, 12, 10, 7)
    module = nn.Conv(5, (3, 3), padding="VALID")
    params = module.init(jax.random.key(0), x)["params"]

    def flax_loss(p, x):
        return jnp.sum(jnp.sin(module.apply({"params": p}, x)))

    def ops_loss(p, x):
        return jnp.sum(jnp.sin(ops.conv2d(x, p["kernel"], p["bias"])))

    y = ops.conv2d(x, params["kernel"], params["bias"])
    assert_close(y, module.apply({"params": params}, x), 1e-5)
    g_flax = jax.grad(flax_loss, argnums=(0, 1))(params, x)
    g_ops = jax.grad(ops_loss, argnums=(0, 1))(params, x)
    for got, want in zip(jax.tree.leaves(g_ops), jax.tree.leaves(g_flax), strict=True):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("kernel_size, options", [
    ((3, 3), {"padding": "SAME"}), ((5, 5), {}), ((5, 5), {"padding": "SAME"}),
    ((3, 3), {"strides": (2, 2)}), ((3, 3), {"kernel_dilation": (2, 2)}),
])
def test_conv3x3_is_flax_conv_for_any_shape(kernel_size, options):
    """A model edited to another padding or kernel size trains on CPU as nn.Conv would: the
    shapes conv2d covers go through it, the others are nn.Conv itself (it raised for SAME)."""
    x = rand(1, 3, 12, 10, 4)
    fast, flax = (layer(6, kernel_size, **options) for layer in (ops.Conv3x3, nn.Conv))
    params = fast.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax.init(
        jax.random.key(0), x))
    assert_close(jax.jit(fast.apply)(params, x), flax.apply(params, x), 1e-5)
    g_fast = jax.grad(lambda p: jnp.sum(jnp.sin(fast.apply(p, x))))(params)
    g_flax = jax.grad(lambda p: jnp.sum(jnp.sin(flax.apply(p, x))))(params)
    for got, want in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_flax), strict=True):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("window, strides, padding", [
    ((2, 2), (2, 2), "VALID"), ((3, 3), (3, 3), "VALID"), ((2, 2), (1, 1), "VALID"),
    ((2, 2), (2, 2), "SAME"), ((2, 2), None, "VALID"),
])
def test_max_pool_is_flax_max_pool_for_any_window(window, strides, padding):
    x = rand(2, 2, 9, 8, 3)
    want = nn.max_pool(x, window, strides=strides, padding=padding)
    assert_close(jax.jit(ops.max_pool, static_argnums=(1, 2, 3))(x, window, strides, padding),
                 want, 0)


@pytest.mark.parametrize("shape", [(4, 28, 28, 1, 32), (3, 9, 7, 5, 6), (2, 26, 26, 32, 64)])
def test_conv2d_bfloat16(shape):
    b, h, w, cin, cout = shape
    x, k, bias = rand(0, b, h, w, cin), rand(1, 3, 3, cin, cout, scale=0.3), rand(2, cout)
    dy = rand(3, b, h - 2, w - 2, cout)
    f = jax.jit(lambda x, k, bias: ops.conv2d(x, k, bias, compute_dtype=jnp.bfloat16))
    y, vjp = jax.vjp(f, x, k, bias)
    assert y.dtype == jnp.bfloat16
    y_ref, vjp_ref = jax.vjp(ref_conv, x, k, bias)
    assert_close(y, y_ref, 2e-2)
    grads = vjp(dy.astype(jnp.bfloat16))
    assert [g.dtype for g in grads] == [jnp.float32] * 3  # gradients in the primal dtypes
    for got, want in zip(grads, vjp_ref(dy), strict=True):
        assert_close(got, want, 2e-2)


def test_conv2d_vjp_is_linear_in_the_cotangent():
    # The custom VJP is linear in the cotangent: grad of 2*loss is 2*grad of loss.
    x, k, bias = rand(0, 2, 6, 6, 3), rand(1, 3, 3, 3, 2), rand(2, 2)
    g1 = jax.grad(lambda k: jnp.sum(ops.conv2d(x, k, bias) ** 2))(k)
    g2 = jax.grad(lambda k: 2 * jnp.sum(ops.conv2d(x, k, bias) ** 2))(k)
    assert_close(g2, 2 * g1, 1e-6)


def flax_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize("shape", [(4, 24, 24, 64), (3, 6, 10, 5), (2, 9, 7, 3), (1, 2, 2, 1)])
def test_max_pool_matches_flax_without_ties(shape):
    # Continuous random values: no ties, so values and gradients equal flax's exactly.
    x, = (rand(0, *shape),)
    y, vjp = jax.vjp(jax.jit(ops.max_pool_2x2), x)
    y_ref, vjp_ref = jax.vjp(flax_pool, x)
    np.testing.assert_array_equal(y, y_ref)
    g = rand(1, *y.shape)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])


def test_max_pool_ties_go_to_first_max_in_row_major_order():
    x = jnp.array([[1.0, 1.0], [1.0, 1.0]]).reshape(1, 2, 2, 1)  # four-way tie
    x = jnp.concatenate([x, jnp.array([[0.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)], axis=-1)
    _, vjp = jax.vjp(ops.max_pool_2x2, x)
    (dx,) = vjp(jnp.array([5.0, 7.0]).reshape(1, 1, 1, 2))
    np.testing.assert_array_equal(dx[0, :, :, 0], [[5.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(dx[0, :, :, 1], [[0.0, 7.0], [0.0, 0.0]])
    # Total gradient is conserved, as with flax (one element per window receives it).
    _, vjp_ref = jax.vjp(flax_pool, x)
    np.testing.assert_allclose(vjp_ref(jnp.array([5.0, 7.0]).reshape(1, 1, 1, 2))[0].sum(), 12.0)


def test_max_pool_after_relu_trains_like_flax():
    # In the model ties are windows of ReLU zeros: the composed gradient equals flax's.
    x = rand(0, 3, 8, 8, 4)

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(jax.nn.relu(x))))

    np.testing.assert_allclose(jax.grad(loss(ops.max_pool_2x2))(x), jax.grad(loss(flax_pool))(x))


def test_the_steps_jit_is_a_real_jit_with_the_cpu_option_and_the_same_numbers():
    """The training step's jits pass fast.COMPILER_OPTIONS to jax.jit: still real jit objects
    (`.lower()` works, train.train_step's too), and the option changes no number."""
    from mnist_flax import train

    assert hasattr(train.train_step, "lower") and hasattr(train.eval_batches, "lower")
    f = jax.jit(lambda x, k, b: jax.grad(lambda k: jnp.sum(ops.conv2d(x, k, b) ** 2))(k),
                compiler_options=fast.COMPILER_OPTIONS)
    assert f.lower(jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32),
                   jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32),
                   jax.ShapeDtypeStruct((4,), jnp.float32)).compile() is not None
    assert fast.COMPILER_OPTIONS in ({}, fast.CPU_OPTIONS)
    x, k, bias = rand(0, 2, 8, 8, 3), rand(1, 3, 3, 3, 4), rand(2, 4)
    plain = jax.jit(lambda x, k, b: jax.grad(lambda k: jnp.sum(ops.conv2d(x, k, b) ** 2))(k))
    assert_close(f(x, k, bias), plain(x, k, bias), 1e-5)


def test_the_initialisation_with_init_options_gives_the_default_options_bits():
    """train.create_train_state compiles the initialisation with fast.INIT_OPTIONS (LLVM -O1),
    which only shortens the compile (benchmarks/compile_time.py): the tutorial model's
    parameters are bit for bit those XLA's default options give."""
    from mnist_flax import configs, models, train

    key = jax.random.key(3)
    init = jax.jit(functools.partial(models.create_model(configs.load()).init, train=False),
                   compiler_options=XLA_DEFAULT_LEVEL)  # Not the tests' (conftest.py).
    default = init(jax.random.split(key)[0], jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
    used = train.create_train_state(configs.load(), key).params
    jax.tree.map(np.testing.assert_array_equal, used, default)


def test_the_tests_llvm_level_gives_the_bits_of_xlas_default():
    """The tests compile at conftest.TESTS_XLA_FLAG's LLVM level, to save time: three training
    steps of the tutorial's model give bit for bit the state and metrics of XLA's default -O3,
    so the tests check the numbers users get."""
    from mnist_flax import configs, train

    assert conftest.TESTS_XLA_FLAG in os.environ["XLA_FLAGS"]
    images, labels = conftest.synthetic_digits(128)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    default = jax.jit(train.train_step_fn, donate_argnums=0,
                      compiler_options={**fast.COMPILER_OPTIONS, **XLA_DEFAULT_LEVEL})
    results = []
    for step in (train.train_step, default):
        state, metrics = train.create_train_state(configs.load(), jax.random.key(0)), []
        for _ in range(3):
            state, m = step(state, batch)
            metrics.append(m)
        results.append(jax.device_get((state.params, state.opt_state, metrics)))
    conftest.assert_trees_identical(*results)


def test_tune_host_allocator_is_safe_and_idempotent():
    first = process.tune_host_allocator()
    assert isinstance(first, bool)
    assert process.tune_host_allocator() == first  # Idempotent.
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first
    # Allocation-heavy work still computes the right thing afterwards.
    a = np.ones((2048, 2048), np.float32)
    assert float((a @ a)[0, 0]) == 2048.0


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mnist_flax import fast
    from mnist_flax.fast import ops
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 12, 12, 5)), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=(16, 10, 10, 1)), jnp.float32)
    k1 = jnp.asarray(rng.normal(size=(3, 3, 1, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    def loss(k, b, x, pool, conv):
        return jnp.sum(jnp.sin(pool(jax.nn.relu(conv(x, k, b)))))
    ref_conv = lambda x, k, b: lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST) + b
    ref_pool = lambda y: y.reshape(16, 5, 2, 5, 2, 6).max((2, 4))
    g = jax.jit(jax.value_and_grad(lambda k, b, x: loss(k, b, x, ops.max_pool_2x2, ops.conv2d),
                                   argnums=(0, 1, 2)),
                in_shardings=(None, None, NamedSharding(mesh, P("batch"))),
                compiler_options=fast.COMPILER_OPTIONS or None)
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    got = g(k, b, xs)
    want = jax.value_and_grad(lambda k, b, x: loss(k, b, x, ref_pool, ref_conv),
                              argnums=(0, 1, 2))(k, b, x)
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4, atol=2e-4)
    assert got[1][2].sharding.spec == P("batch"), got[1][2].sharding
    # the 9-tap (one input channel) path, sharded
    f1 = jax.jit(jax.grad(lambda k, x: jnp.sum(ops.conv2d(x, k, b[:5]) ** 2)),
                 in_shardings=(None, NamedSharding(mesh, P("batch"))))
    w1 = jax.grad(lambda k, x: jnp.sum(ref_conv(x, k, b[:5]) ** 2))(k1, x1)
    x1s = jax.device_put(x1, NamedSharding(mesh, P("batch")))
    np.testing.assert_allclose(np.asarray(f1(k1, x1s)), np.asarray(w1), rtol=2e-4, atol=2e-3)
    print("OK")
""")


def test_sharded_over_batch_on_8_host_devices():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = conftest.device_flags(8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
