"""Issue 31's leads for a faster CPU step, each measured against the form fast/ops.py uses.

    python benchmarks/speed_leads.py [--rounds=5] [--step_rounds=40]

1. Winograd: conv2 (26x26x32 -> 24x24x64, 3x3, batch 128) as F(4x4, 3x3) (Lavin and Gray,
2016): each 6x6 input tile and each 3x3 filter is transformed, 36 batched GEMMs of 4608 tiles do a
quarter of the direct form's multiplications, and the 4x4 output tiles are transformed back. The
backward pass is the same pieces transposed (input gradient) and one more GEMM (weight gradient).
Each piece is jitted alone with fast.COMPILER_OPTIONS, as fast/ops.py's forms are, and interleaved
round by round; medians in ms. Also the Winograd result's largest difference from the direct
one, relative to the largest value, forward and both gradients.
2. conv2's weight gradient in other forms: one GEMM over a width-only im2col (dy padded per
kernel row), 9 per-tap GEMMs, the batch in two halves.
3. conv1's weight gradient as autodiff's convolution instead of one GEMM, and dropout masks
from 8-bit random numbers (4 per threefry word) instead of `jax.random.bernoulli`'s 32-bit ones:
alone, like the pieces above, and in the whole train_step (the default config, one batch, each
variant swapped in while its step is traced; the steps interleaved, medians).
The last line is one JSON object. Nothing in the package uses this code: it is the measurement
behind docs/speed.md's "Tried and lost".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mnist_flax import configs, fast, train
from mnist_flax.fast import ops
from mnist_flax.run import process

# F(4x4, 3x3) with the points 0, +-1, +-2 and infinity (Lavin and Gray, section 4.2).
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float32)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float32)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float32)


def _combine(row, parts):
    """sum_i row[i] * parts[i], zeros skipped: the transforms are sparse small matrices."""
    pairs = zip(row, parts, strict=True)
    terms = [p if c == 1 else -p if c == -1 else p * c for c, p in pairs if c]
    return sum(terms[1:], terms[0])


def _separable(mat, grid):
    """out[i][j] = sum_ab mat[i, a] mat[j, b] grid[a][b], rows first."""
    rows = [[_combine(mat[i], [grid[a][b] for a in range(len(grid))])
             for b in range(len(grid[0]))] for i in range(len(mat))]
    return [[_combine(mat[j], r) for j in range(len(mat))] for r in rows]


def input_transform(x):
    """(N, 4T+2, 4T+2, C) -> (36, N*T*T, C): B^T d B of every overlapping 6x6 tile."""
    n, h, _, c = x.shape
    span = h - 5
    tiles = [[x[:, a:a + span:4, b:b + span:4] for b in range(6)] for a in range(6)]
    return jnp.stack([v for row in _separable(BT, tiles) for v in row]).reshape(36, -1, c)


def input_transform_t(dv, x_shape):
    """The transpose of input_transform: each tile's B dV B^T, overlapping tiles added."""
    n, h, w, c = x_shape
    t = (h - 2) // 4
    g = dv.reshape(6, 6, n, t, t, c)
    tiles = _separable(BT.T, [[g[a, b] for b in range(6)] for a in range(6)])
    dx = jnp.zeros(x_shape, dv.dtype)
    for a in range(6):
        for b in range(6):
            dx = dx.at[:, a:a + 4 * t - 3:4, b:b + 4 * t - 3:4].add(tiles[a][b])
    return dx


def output_transform(m, n, t):
    """(36, N*T*T, Co) -> (N, 4T, 4T, Co): A^T M A of every tile."""
    co = m.shape[-1]
    g = m.reshape(6, 6, n, t, t, co)
    y = _separable(AT, [[g[a, b] for b in range(6)] for a in range(6)])
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # (N, T, 4, T, 4, Co)
    return y.reshape(n, 4 * t, 4 * t, co)


def output_transform_t(dy):
    """The transpose of output_transform: (N, 4T, 4T, Co) -> (36, N*T*T, Co)."""
    co = dy.shape[-1]
    tiles = [[dy[:, i::4, j::4] for j in range(4)] for i in range(4)]
    return jnp.stack([v for row in _separable(AT.T, tiles) for v in row]).reshape(36, -1, co)


def kernel_transform(k):
    return jnp.einsum("xa,abio,yb->xyio", G, k, G).reshape(36, *k.shape[2:])


@jax.custom_vjp
def winograd_conv(x, k, b):
    n, h = x.shape[:2]
    m = jnp.einsum("pqc,pco->pqo", input_transform(x), kernel_transform(k))
    return output_transform(m, n, (h - 2) // 4) + b


def _fwd(x, k, b):
    v, u = input_transform(x), kernel_transform(k)
    n, h = x.shape[:2]
    y = output_transform(jnp.einsum("pqc,pco->pqo", v, u), n, (h - 2) // 4) + b
    return y, (v, u, x.shape, k.shape)


def _bwd(res, dy):
    v, u, x_shape, k_shape = res
    dm = output_transform_t(dy)
    dx = input_transform_t(jnp.einsum("pqo,pco->pqc", dm, u), x_shape)
    du = jnp.einsum("pqc,pqo->pco", v, dm).reshape(6, 6, *k_shape[2:])
    return dx, jnp.einsum("xa,xyio,yb->abio", G, du, G), jnp.sum(dy, (0, 1, 2))


winograd_conv.defvjp(_fwd, _bwd)


def _with_grads(conv):
    def run(x, k, b, dy):
        y, vjp = jax.vjp(conv, x, k, b)
        return y, *vjp(dy)
    return run


def weight_grad_width_im2col(x, dy):
    """dk as one GEMM: x's 3 column shifts side by side (K: rows), dy's 3 row shifts padded."""
    kh, ow, ci, co = 3, dy.shape[2], x.shape[-1], dy.shape[-1]
    xw = jnp.concatenate([x[:, :, j:j + ow] for j in range(kh)], axis=-1)
    dys = jnp.concatenate([jnp.pad(dy, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0)))
                           for i in range(kh)], axis=-1)
    dk = jnp.dot(xw.reshape(-1, kh * ci).T, dys.reshape(-1, kh * co))
    return dk.reshape(kh, ci, kh, co).transpose(2, 0, 1, 3)


def weight_grad_per_tap(x, dy):
    n, oh, ow, co = dy.shape
    d = dy.reshape(-1, co)
    return jnp.stack([x[:, i:i + oh, j:j + ow].reshape(-1, x.shape[-1]).T @ d
                      for i in range(3) for j in range(3)]).reshape(3, 3, x.shape[-1], co)


def weight_grad_halves(x, dy):
    return sum(ops._conv_kernel_grad(a, b, (3, 3, x.shape[-1], dy.shape[-1]))
               for a, b in zip(jnp.split(x, 2), jnp.split(dy, 2), strict=True))


_KERNEL_GRAD = ops._conv_kernel_grad


def _conv1_weight_grad_as_conv(x, dy, kshape):
    """conv1's (one input channel) weight gradient as the convolution conv2's already is."""
    if x.shape[-1] != 1:
        return _KERNEL_GRAD(x, dy, kshape)
    return lax.conv_general_dilated(x, dy, (1, 1), "VALID",
                                    dimension_numbers=("CHWN", "IHWO", "HWNC"))


def _masks_8bit(key, shape=(128, 9216), rate=0.25):
    """Keep-masks from 8-bit random numbers, 4 per threefry word; rate * 256 must be whole."""
    bits = jax.random.bits(key, (*shape[:-1], shape[-1] // 4), jnp.uint32)
    return lax.bitcast_convert_type(bits, jnp.uint8).reshape(shape) >= round(rate * 256)


def _dropout_8bit(self, inputs, deterministic=None, rng=None):
    """nn.Dropout with `_masks_8bit`."""
    if self.rate == 0 or nn.merge_param("deterministic", self.deterministic, deterministic):
        return inputs
    keep = _masks_8bit(self.make_rng(self.rng_collection), inputs.shape, self.rate)
    return jnp.where(keep, inputs / (1 - self.rate), 0)


def step_variants(rounds: int) -> dict[str, float]:
    """Median ms of the whole train_step: as committed, and with each variant traced in."""
    config = configs.load()
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (128, 28, 28, 1), np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, 128).astype(np.int32))}
    variants = {"as committed": (None, None, None),
                "conv1 weight gradient as a convolution":
                    (ops, "_conv_kernel_grad", _conv1_weight_grad_as_conv),
                "dropout masks from 8-bit random numbers": (nn.Dropout, "__call__", _dropout_8bit)}
    jobs = {}
    for name, (owner, attr, replacement) in variants.items():
        state = train.create_train_state(config, jax.random.key(0))
        step = jax.jit(train.train_step_fn, compiler_options=fast.COMPILER_OPTIONS)
        original = getattr(owner, attr) if owner else None
        if owner:  # Traced (and compiled) now, with the variant in place.
            setattr(owner, attr, replacement)
        try:
            jax.block_until_ready(step(state, batch))
        finally:
            if owner:
                setattr(owner, attr, original)
        jobs[name] = (step, state)
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, (step, state) in jobs.items():
            start = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: round(statistics.median(t), 1) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step_rounds", type=int, default=40)
    args = parser.parse_args()
    process.tune_host_allocator()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 26, 26, 32), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 32, 64), np.float32) * 0.06)
    b = jnp.asarray(rng.standard_normal(64, np.float32))
    dy = jnp.asarray(rng.standard_normal((128, 24, 24, 64), np.float32))
    x0 = jnp.asarray(rng.random((128, 28, 28, 1), np.float32))
    dy0 = jnp.asarray(rng.standard_normal((128, 26, 26, 32), np.float32))
    v, u = input_transform(x), kernel_transform(k)
    m = jnp.asarray(rng.standard_normal((36, 4608, 64), np.float32))
    pieces = {
        "direct: forward": (lambda x, k, b: ops.conv2d(x, k, b), (x, k, b)),
        "direct: forward + both gradients": (_with_grads(ops.conv2d), (x, k, b, dy)),
        "winograd: input transform": (input_transform, (x,)),
        "winograd: forward GEMMs": (lambda v, u: jnp.einsum("pqc,pco->pqo", v, u), (v, u)),
        "winograd: output transform": (lambda m: output_transform(m, 128, 6), (m,)),
        "winograd: output transform, transposed": (output_transform_t, (dy,)),
        "winograd: input-gradient GEMMs": (lambda m, u: jnp.einsum("pqo,pco->pqc", m, u), (m, u)),
        "winograd: input transform, transposed": (
            lambda d: input_transform_t(d, x.shape), (v,)),
        "winograd: weight-gradient GEMMs": (lambda v, m: jnp.einsum("pqc,pqo->pco", v, m), (v, m)),
        "winograd: forward": (winograd_conv, (x, k, b)),
        "winograd: forward + both gradients": (_with_grads(winograd_conv), (x, k, b, dy)),
        "weight gradient: as fast/ops.py": (
            lambda x, dy: ops._conv_kernel_grad(x, dy, (3, 3, 32, 64)), (x, dy)),
        "weight gradient: width im2col, one GEMM": (weight_grad_width_im2col, (x, dy)),
        "weight gradient: 9 per-tap GEMMs": (weight_grad_per_tap, (x, dy)),
        "weight gradient: the batch in two halves": (weight_grad_halves, (x, dy)),
        "conv1 weight gradient: as fast/ops.py": (
            lambda x, dy: ops._conv_kernel_grad(x, dy, (3, 3, 1, 32)), (x0, dy0)),
        "conv1 weight gradient: as a convolution": (
            lambda x, dy: _conv1_weight_grad_as_conv(x, dy, None), (x0, dy0)),
        "dropout masks: jax.random.bernoulli": (
            lambda key: jax.random.bernoulli(key, 0.75, (128, 9216)), (jax.random.key(0),)),
        "dropout masks: 8-bit random numbers": (_masks_8bit, (jax.random.key(0),)),
    }
    jitted = {name: (jax.jit(f, compiler_options=fast.COMPILER_OPTIONS), a)
              for name, (f, a) in pieces.items()}
    direct = jitted["direct: forward + both gradients"][0](x, k, b, dy)
    winograd = jitted["winograd: forward + both gradients"][0](x, k, b, dy)
    errors = {name: float(jnp.max(jnp.abs(w - d)) / jnp.max(jnp.abs(d)))
              for name, w, d in zip(("y", "dx", "dkernel", "dbias"), winograd, direct, strict=True)}
    times = {name: [] for name in jitted}
    for _ in range(args.rounds):
        for name, (f, a) in jitted.items():
            jax.block_until_ready(f(*a))
            start = time.perf_counter()
            jax.block_until_ready(f(*a))
            times[name].append(1e3 * (time.perf_counter() - start))
    medians = {name: round(statistics.median(t), 2) for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:42s} {ms:7.1f} ms")
    print("winograd vs direct, largest difference / largest value:",
          ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    steps = step_variants(args.step_rounds)
    for name, ms in steps.items():
        print(f"train_step, {name:40s} {ms:7.1f} ms")
    print(json.dumps({"ms": medians, "relative_error": errors, "train_step_ms": steps}))


if __name__ == "__main__":
    main()
