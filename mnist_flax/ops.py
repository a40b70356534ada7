"""Fast ops for the MNIST CNN's training step on CPU, in pure jax.numpy / jax.lax.

Every trick here exists because of a measurement on the 2-core AVX-512 CPU (AMD EPYC, Zen 4) this
project trains on, with jax/jaxlib 0.10.2, full training step (forward + backward + Adam, batch
128). Numbers are medians of interleaved runs; "quiet" ones were taken while the machine was
otherwise idle, the rest while other training jobs shared it (load 6-8), so read those as ratios.
Scripts: /work/scratch/speed/ (README.md there).

What the plain Flax step (nn.Conv, nn.max_pool; ~290 ms/step quiet) spends its time on, and the fix:

1. `tune_host_allocator`: ~45% of the plain step was the kernel zeroing fresh pages. glibc serves
   XLA's big per-step temporaries with mmap and munmaps them on free: ~86,000 minor faults per
   step. Keeping them in the heap: 286 -> 164 ms/step (quiet), ~0 faults per step.
2. `xla_compiler_options`: jaxlib 0.10 hands unpadded convolutions to YNNPACK, 2-2.5x slower here
   than XLA's Eigen convolution for the 3x3 conv 32->64 (forward 37 vs 15 ms, weight gradient 42
   vs 27 ms, isolated, quiet). The per-jit option keeps YNNPACK for dots and reductions and sends
   convolutions to Eigen: plain step 164 -> 118 ms (quiet). No graph-level trick reaches Eigen
   without waste (tried: pad by 3 and slice, +12.5% FLOPs; a "dy as input" weight-gradient conv,
   which Eigen runs 50x slower), hence a compile option, not an op.
3. `max_pool_2x2`: the gradient of `nn.max_pool` (reduce_window -> select_and_scatter) costs ~40
   ms per step; a reshape + max with a hand-written, fused backward costs ~3-5 ms.
4. `conv2d` on one input channel (conv 1->32): 9 fused multiply-adds (0.7 ms vs 1.7 ms YNNPACK /
   5 ms Eigen) and its weight gradient as one (9, N) x (N, 32) GEMM (2 ms vs 2.5-5 ms).

Tried and not used (measured): im2col / GEMM forms of the 32->64 conv and its gradients in
float32 or bfloat16 (materialising the 85 MB im2col costs more than the GEMM saves; bf16 GEMMs are
2x faster only through YNNPACK dots), col2im for the input gradient, 9 accumulated per-tap GEMMs,
bfloat16 convolutions (Eigen and YNNPACK: no faster than float32), "rbg"/"unsafe_rbg" dropout
PRNGs (3x slower than threefry here), XNNPACK / oneDNN options, YNNPACK for elementwise fusions
(+12%), `lax.scan` over steps (minutes to compile, far slower).

Everything is jnp/lax only: it runs (and is tested) under jit with batch sharding over several
devices, and on GPU/TPU, where `xla_compiler_options()` returns {}.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv2d", "jit", "max_pool_2x2", "tune_host_allocator", "xla_compiler_options"]

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
    # The convolution autodiff emits (batch and feature dims swapped, dy as a 24x24 "kernel").
    # With xla_compiler_options() on CPU it runs in Eigen (27 ms), else YNNPACK (42 ms); an
    # explicit im2col GEMM was no faster than either.
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
    # Residuals in the compute dtype: the bf16 path saves half the activation memory traffic.
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

    Same function as `flax.linen.Conv(features, (kh, kw), padding='VALID')` /
    `lax.conv_general_dilated(x, kernel, (1, 1), 'VALID') + bias`, with a `jax.custom_vjp` whose
    pieces are chosen for XLA:CPU (see the module docstring):

    * few input channels (<= 4, e.g. MNIST's first layer): forward as 9 fused multiply-adds
      (0.7 ms vs 1.7-5 ms per step at batch 128) and weight gradient as one small GEMM (2 ms);
    * otherwise forward and weight gradient as the convolutions autodiff would emit (fast when the
      step is jitted with `xla_compiler_options()`), input gradient as a padded "full" conv.

    `compute_dtype` (e.g. jnp.bfloat16) is the dtype of the conv operands and of the result, as
    Linen's `dtype`; accumulation, bias add and the bias gradient are float32, and gradients come
    back in the parameters'/input's own dtypes. Default: x's dtype. On this CPU the bf16
    convolutions themselves are no faster (Eigen/YNNPACK convert), but the halved activation and
    residual traffic made the full step ~6% faster (85 -> 79 ms/step quiet, 160 -> 151 CPU-ms).
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

    Equals `flax.linen.max_pool(x, (2, 2), strides=(2, 2))` in value. Its gradient is written by
    hand: the pooled gradient goes to the window's maximum. Flax's gradient goes through XLA's
    select_and_scatter, which costs ~40 ms per step on this CPU; this one is a single fused
    elementwise pass (~2-4 ms), and autodiff of the reshape+max form (~8 ms) also divides by
    the tie count.

    Ties: the whole gradient goes to the first maximal element in row-major window order
    (top-left, top-right, bottom-left, bottom-right). Flax/XLA also gives it to exactly one element,
    but which one is an implementation detail; autodiff of reshape+max would split it evenly. In
    this network ties are windows of ReLU zeros, whose gradient ReLU zeroes anyway, so training is
    identical. Without ties, values and gradients equal flax's exactly.
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


# --------------------------------------------------------------------------------------------
# XLA:CPU compile options
# --------------------------------------------------------------------------------------------

_CPU_OPTIONS = {
    # Let YNNPACK take dots and reductions only; convolutions go to XLA's Eigen kernels (2-2.5x
    # faster here). REDUCE must stay: without YNNPACK, XLA rewrites the bias-gradient sums into
    # reduce-windows that cost 16 ms instead of 1.7 ms. ELTWISE in YNNPACK was slower (+12%).
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _cpu_options_supported() -> bool:
    try:
        jax.jit(lambda a: a + 1, compiler_options=_CPU_OPTIONS).lower(
            jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
        return True
    except Exception:  # an older/newer jaxlib without this option
        return False


def xla_compiler_options(backend: str | None = None) -> dict[str, str]:
    """Per-jit XLA options that make the training step fast on CPU; {} elsewhere.

    Use as `jax.jit(train_step, compiler_options=ops.xla_compiler_options())`: it needs no
    environment variable and touches only that jit. Measured on the full step (batch 128):
    the convolutions drop from ~95 ms (YNNPACK) to ~60 ms (Eigen). Returns {} off CPU and when
    this jaxlib does not know the option (checked once by compiling a one-op function).
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or not _cpu_options_supported():
        return {}
    return dict(_CPU_OPTIONS)


def jit(fun: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` plus `xla_compiler_options()` for the backend in use.

    The options depend on the backend, which must not be started at import time (a multi-host
    run calls jax.distributed.initialize() first), so the jitted function is built on first call.
    """
    @functools.cache
    def jitted() -> Callable:
        return jax.jit(fun, compiler_options=xla_compiler_options(), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted()(*args, **kwargs)

    return call


# --------------------------------------------------------------------------------------------
# tune_host_allocator
# --------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_allocator_tuned = False


def tune_host_allocator() -> bool:
    """Keep big host allocations in glibc's heap, so XLA:CPU stops page-faulting every step.

    Why: XLA:CPU mallocs each step's temporaries (10-90 MB; one can exceed 32 MB), glibc mmaps
    them and munmaps them on free, and the next step faults the same pages back in: ~86,000 minor
    faults (~350 MB) per step, measured with getrusage; the plain Flax step spent ~45% of its time
    in the kernel. Via mallopt: M_MMAP_MAX=0 (big blocks come from the heap), M_TRIM_THRESHOLD=2 GiB
    and M_TOP_PAD=64 MiB (the heap top is never given back), M_ARENA_MAX=1 (XLA's worker threads
    share the sbrk-grown main arena; other arenas' heaps are capped at 64 MB, fall back to mmap
    and are trimmed with madvise). Measured: ~0 faults per step after the first; plain Flax step
    286 -> 164 ms (quiet machine), better than GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (192 ms) and
    with no environment variable; the fast step (ops + xla_compiler_options) -25% wall, -17% CPU.

    Cost: the process keeps its peak heap (a few hundred MB here) instead of returning it to the
    OS, and all threads share one malloc arena (no contention seen: XLA allocates per step).

    Call it before JAX runs its first computation (at program start): threads that already own a
    malloc arena keep it, so a late call has no measurable effect; a warning is logged then.
    Idempotent; a no-op returning False off Linux/glibc or if mallopt fails. Returns True when the
    settings are in effect.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20),
                (_M_ARENA_MAX, 1))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return False
    try:
        from jax._src import xla_bridge
        late = xla_bridge.backends_are_initialized()
    except Exception:
        late = False
    if late:
        logging.getLogger(__name__).warning(
            "tune_host_allocator() called after JAX initialised its backend; XLA's threads keep "
            "their malloc arenas, so most of the speed-up is lost. Call it at program start.")
    _allocator_tuned = True
    return True
