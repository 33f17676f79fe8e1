"""`conv_general_dilated` that runs at PyTorch speed on CPU; XLA's own convolution elsewhere.

Why this exists: XLA:CPU lowers some convolutions very slowly (upstream jax-ml/jax#23713 for
depthwise convs, openxla/xla#34273): a 3x3 512->512 conv over a 2x2 map takes ~100 ms where
PyTorch takes 4 ms, a depthwise 3x3 over 96 channels at 32x32 ~30 ms. ResNet-18 and MobileNet-V2
students hit those shapes in every late stage, which made a CPU training step 7-10x slower than
torchvision's. The same convolution written as shifted slices + one matmul (im2col), or for a
depthwise conv as a sum of shifted products, is 30-60x faster on those shapes.

What it guarantees: `conv_general_dilated` takes `jax.lax.conv_general_dilated`'s arguments (it
is passed to `nnx.Conv(conv_general_dilated=...)`) and returns the same values up to float
rounding (the sums run in another order), forward and under `jax.grad` / `jax.vmap`. On GPUs and
TPUs the computation is exactly `jax.lax.conv_general_dilated` (cuDNN on NVIDIA). On CPU the
fast form covers what the models use: channels-last (NHWC / HWIO) dense convs on small maps and
depthwise convs (one filter per channel), any kernel, stride and explicit / "SAME" / "VALID"
padding; anything else (large maps, dilation, other grouped convs, other layouts) takes XLA's
convolution, unchanged.
Set PAND_NATIVE_CONV=1 (or trace inside `with xla_convolution():`) to force XLA's convolution
everywhere; the benchmarks use it to measure the difference.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os

import jax.numpy as jnp
from jax import lax


# Dense convs take the matmul form only on maps of at most 16x16 outputs: XLA:CPU's own kernel
# is slow on small maps (100 ms for 3x3 512->512 at 2x2) but as fast or faster on large ones
# (28x28 and up, where im2col patches cost 9x the memory traffic; measured in bench/RESULTS.md).
# Depthwise convs always take the shifted-product form: XLA:CPU is slow on them at every size.
DENSE_MAX_POSITIONS = 16 * 16


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
    """Drop-in for `jax.lax.conv_general_dilated` (same arguments, same result)."""
    def native(lhs, rhs):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
            out_sharding=out_sharding)

    if os.environ.get("PAND_NATIVE_CONV") == "1" or not _cpu_form_applies(
            lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, out_sharding):
        return native(lhs, rhs)
    pads = (lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], window_strides, padding)
            if isinstance(padding, str) else padding)
    out_positions = math.prod((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(
        lhs.shape[1:-1], rhs.shape[:-2], window_strides, pads))
    if feature_group_count == 1 and out_positions > DENSE_MAX_POSITIONS:
        return native(lhs, rhs)

    def cpu(lhs, rhs):
        return _cpu_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, pads)),
                         precision, preferred_element_type)

    # Chosen per platform when the computation is lowered, not by a Python check of
    # jax.default_backend() while tracing: the platform XLA compiles for is what matters (a CPU
    # computation on a GPU host, or an exported function, gets the right branch), and only the
    # chosen branch reaches the compiler. It works under jit, grad and vmap like lax.switch
    # (under grad each branch returns zeros for the other's residuals; the conditional's index
    # is a constant after lowering, so XLA inlines the branch and drops them).
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=native)


@contextlib.contextmanager
def xla_convolution():
    """Functions traced inside this block use XLA's convolution on every platform (jit caches
    traces: only functions traced afresh are affected)."""
    before = os.environ.get("PAND_NATIVE_CONV")
    os.environ["PAND_NATIVE_CONV"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PAND_NATIVE_CONV"]
        else:
            os.environ["PAND_NATIVE_CONV"] = before


def _channels_last_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1, *spatial),
                                    rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
                                    out_spec=(0, ndim - 1, *spatial))


def _cpu_form_applies(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, out_sharding) -> bool:
    if dimension_numbers is None or lhs.ndim < 3:
        return False
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    in_ch, out_ch = lhs.shape[-1], rhs.shape[-1]
    depthwise = feature_group_count == in_ch == out_ch and rhs.shape[-2] == 1
    return (numbers == _channels_last_numbers(lhs.ndim)
            and all(d == 1 for d in (lhs_dilation or ()) + tuple(rhs_dilation or ()))
            and batch_group_count == 1 and out_sharding is None
            and (feature_group_count == 1 or depthwise)
            and (isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding)))


def _cpu_conv(x, w, strides, pads, precision, preferred_element_type):
    out_dtype = preferred_element_type or jnp.result_type(x, w)
    # Everything in fp32 at least (XLA:CPU computes bf16 convs in fp32 too): the gradient w.r.t.
    # the input sums one term per tap, which bf16 would round at every add.
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    x, w = x.astype(acc_dtype), w.astype(acc_dtype)
    taps = list(_shifted_taps(x, w.shape[:-2], strides, pads))
    if w.shape[-2] == x.shape[-1]:  # dense: im2col, one matmul over (taps x input channels)
        y = jnp.dot(jnp.concatenate(taps, axis=-1), w.reshape(-1, w.shape[-1]),
                    precision=precision)
    else:  # depthwise: sum over taps of the shifted input times that tap's per-channel weight
        per_tap = w.reshape(len(taps), w.shape[-1])
        y = sum(t * per_tap[i] for i, t in enumerate(taps))
    return y.astype(out_dtype)


def _shifted_taps(x, kernel_shape, strides, pads):
    """For each kernel offset (row-major, as HWIO stores them) the strided view of the padded
    input that this kernel tap multiplies: [N, *output spatial, C] each."""
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_shape = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], kernel_shape, strides)]
    for offsets in itertools.product(*map(range, kernel_shape)):
        limit = [o + s * (m - 1) + 1 for o, s, m in zip(offsets, strides, out_shape)]
        yield lax.slice(x, (0, *offsets, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))
