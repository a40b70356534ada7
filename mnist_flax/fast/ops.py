"""The CNN's convolution and pooling with gradients that XLA:CPU compiles well (`fast` picks them
on CPU only).

Each piece computes the same function as Linen's `nn.Conv` / `nn.max_pool` (tests/test_ops.py pins
values and gradients) and exists because it measured faster on CPU; the figures, and what was
tried and lost, are in docs/speed.md. `Conv3x3` and `max_pool` are the layers the model uses:
any shape these kernels do not cover (SAME padding, strides, another window) is Linen's own.
Everything runs under jit on any backend and with batch sharding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Conv3x3", "conv2d", "max_pool", "max_pool_2x2"]

_DN = ("NHWC", "HWIO", "NHWC")
_TAPS_MAX_CIN = 4  # Input channels up to which conv2d uses the 9-tap elementwise form.


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------


def _conv_valid(x, k):
    """VALID 3x3 conv with float32 accumulation, as lax computes it."""
    if x.shape[-1] <= _TAPS_MAX_CIN:
        # Few input channels: a 9-tap sum of broadcast multiply-adds, one fused loop in XLA.
        kh, kw = k.shape[:2]
        oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        xf, kf = x.astype(jnp.float32), k.astype(jnp.float32)
        y = None
        for i in range(kh):
            for j in range(kw):
                for c in range(x.shape[-1]):
                    t = xf[:, i:i + oh, j:j + ow, c:c + 1] * kf[i, j, c]
                    y = t if y is None else y + t
        return y
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=_DN,
                                    preferred_element_type=jnp.float32)


def _conv_input_grad(dy, k):
    """d(conv)/dx: a "full" conv of dy with the flipped, in/out-swapped kernel.

    Its padding (kh-1 per side) already makes XLA:CPU use Eigen, which runs it near GEMM peak.
    """
    kh, kw = k.shape[:2]
    kf = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    return lax.conv_general_dilated(dy, kf, (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                    dimension_numbers=_DN, preferred_element_type=jnp.float32)


def _conv_kernel_grad(x, dy, kshape):
    """d(conv)/dkernel, float32 accumulation."""
    kh, kw, cin, cout = kshape
    oh, ow = dy.shape[1], dy.shape[2]
    if cin <= _TAPS_MAX_CIN:
        # (9*Cin, N) x (N, Cout) GEMM over the tiny im2col of a few-channel input.
        cols = jnp.stack([x[:, i:i + oh, j:j + ow, c].reshape(-1)
                          for i in range(kh) for j in range(kw) for c in range(cin)], 0)
        dk = jnp.dot(cols, dy.reshape(-1, cout), preferred_element_type=jnp.float32)
        return dk.reshape(kh, kw, cin, cout)
    # The convolution autodiff emits (batch and feature dims swapped, dy as a 24x24 "kernel"),
    # which COMPILER_OPTIONS sends to Eigen on CPU.
    return lax.conv_general_dilated(x, dy, (1, 1), "VALID",
                                    dimension_numbers=("CHWN", "IHWO", "HWNC"),
                                    preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d(x, kernel, bias, compute_dtype):
    y = _conv_valid(x.astype(compute_dtype), kernel.astype(compute_dtype))
    return (y + bias.astype(jnp.float32)).astype(compute_dtype)


def _conv2d_fwd(x, kernel, bias, compute_dtype):
    xc, kc = x.astype(compute_dtype), kernel.astype(compute_dtype)
    y = (_conv_valid(xc, kc) + bias.astype(jnp.float32)).astype(compute_dtype)
    # Residuals in the compute dtype: bf16 halves the activation memory traffic.
    return y, (xc, kc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype),
               jnp.zeros((0,), bias.dtype))


def _conv2d_bwd(compute_dtype, res, dy):
    xc, kc, x_dt, k_dt, b_dt = res
    dyc = dy.astype(compute_dtype)
    dx = _conv_input_grad(dyc, kc).astype(x_dt.dtype)
    dk = _conv_kernel_grad(xc, dyc, kc.shape).astype(k_dt.dtype)
    db = jnp.sum(dy.astype(jnp.float32), axis=(0, 1, 2)).astype(b_dt.dtype)
    return dx, dk, db


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array,
           compute_dtype: jnp.dtype | None = None) -> jax.Array:
    """3x3 (any kh x kw), stride 1, VALID convolution, NHWC input, HWIO kernel, plus bias.

    The same function as `flax.linen.Conv(features, (kh, kw), padding='VALID')`, with a
    `jax.custom_vjp` whose pieces suit XLA:CPU: with few input channels (MNIST's first layer) the
    forward pass is 9 fused multiply-adds and the weight gradient one small GEMM; otherwise the
    convolutions autodiff would emit, and the input gradient as a padded "full" convolution.

    `compute_dtype` (default: x's dtype) is the dtype of the operands and the result, as Linen's
    `dtype`; accumulation, the bias add and the bias gradient are float32.
    """
    compute_dtype = jnp.dtype(compute_dtype or x.dtype)
    return _conv2d(x, kernel, bias, compute_dtype)


# --------------------------------------------------------------------------------------------
# max_pool_2x2
# --------------------------------------------------------------------------------------------


def _pool_windows(x):
    b, h, w, c = x.shape
    xr = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return xr[:, :, 0, :, 0], xr[:, :, 0, :, 1], xr[:, :, 1, :, 0], xr[:, :, 1, :, 1]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, NHWC (odd trailing rows/columns dropped, as VALID pooling does).

    Equals `flax.linen.max_pool(x, (2, 2), strides=(2, 2))` in value; its gradient is written by
    hand as one fused elementwise pass, where Flax's goes through XLA's slow select_and_scatter.
    Ties: the whole gradient goes to the first maximal element in row-major window order (XLA also
    picks exactly one; in this network ties are ReLU zeros, whose gradient ReLU zeroes anyway).
    """
    a, b, c, d = _pool_windows(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _pool_fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _pool_bwd(res, g):
    x, y = res
    a, b, c, d = _pool_windows(x)
    ta = a == y
    tb = (b == y) & ~ta
    tc = (c == y) & ~(ta | tb)
    td = ~(ta | tb | tc)
    zero = jnp.zeros_like(g)
    pick = [jnp.where(t, g, zero) for t in (ta, tb, tc, td)]
    top = jnp.stack(pick[:2], axis=3)  # (B, H/2, W/2, 2, C)
    bottom = jnp.stack(pick[2:], axis=3)
    n, h2, w2, ch = g.shape
    dx = jnp.stack([top, bottom], axis=2).reshape(n, 2 * h2, 2 * w2, ch)
    if dx.shape != x.shape:  # odd sizes: the dropped row/column gets no gradient
        dx = jnp.pad(dx, ((0, 0), (0, x.shape[1] - dx.shape[1]), (0, x.shape[2] - dx.shape[2]),
                          (0, 0)))
    return (dx,)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


class Conv3x3(nn.Conv):
    """`nn.Conv` through `conv2d` where that covers it (stride 1, VALID, no dilation or groups,
    a bias, 2-D): the same parameters ('kernel' HWIO, 'bias') and function, so checkpoints move
    freely between the two; any other shape (SAME padding, strides, ...) is `nn.Conv` itself, so
    a model edited to use one stays correct on CPU."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        ones = (None, 1, (1,) * len(self.kernel_size))
        if not (self.padding == "VALID" and inputs.ndim == 4 and len(self.kernel_size) == 2
                and self.strides in ones and self.input_dilation in ones
                and self.kernel_dilation in ones and self.feature_group_count == 1
                and self.use_bias and self.mask is None and self.precision is None
                and getattr(self, "conv_general_dilated", None) is None
                and getattr(self, "conv_general_dilated_cls", None) is None):
            return super().__call__(inputs)
        shape = (*self.kernel_size, inputs.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return conv2d(inputs, kernel, bias, compute_dtype=self.dtype)


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
    """`nn.max_pool`, through `max_pool_2x2` for its 2x2, stride 2, VALID NHWC case; any other
    window, stride or padding is `nn.max_pool` itself."""
    if (tuple(window_shape) == (2, 2) and tuple(strides or (1, 1)) == (2, 2)
            and padding == "VALID" and inputs.ndim == 4):
        return max_pool_2x2(inputs)
    return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)
