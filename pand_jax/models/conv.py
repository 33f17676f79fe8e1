"""`conv_general_dilated` and `max_pool` that run at PyTorch speed on CPU; XLA's own ops elsewhere.

On CPU the large 2-D channels-last convolutions (dense ones with at least 5e8 multiply-adds,
depthwise ones onto maps of 28x28 or more; see `_onednn_pays`) run on oneDNN, the kernels
PyTorch uses, through custom calls (`pand_jax.models.onednn`); the jnp forms below take the
small ones XLA:CPU is slow on. Where oneDNN cannot be built (another CPU architecture, no C++
compiler; a warning says why) or is switched off (PAND_ONEDNN=0), the jnp forms and XLA's
kernel take them all.

Why the jnp forms exist: XLA:CPU lowers some convolutions very slowly (upstream jax-ml/jax#23713
for depthwise convs, openxla/xla#34273): a 3x3 512->512 conv over a 2x2 map takes ~100 ms where
PyTorch takes 4 ms, a depthwise 3x3 over 96 channels at 32x32 ~30 ms. ResNet-18 and MobileNet-V2
students hit those shapes in every late stage, which made a CPU training step 7-10x slower than
torchvision's. The same convolution written as shifted slices + one matmul (im2col), or for a
depthwise conv as a sum of shifted products, is 30-60x faster on those shapes. XLA:CPU's
gradient of max pooling (select-and-scatter through index arrays) took a quarter of a ResNet-18
training step; `max_pool` reads stride phases instead. The dense convs left to XLA run on its
Eigen kernel, which `import pand_jax` selects (see `pand_jax/__init__.py`).

What it guarantees: `conv_general_dilated` takes `jax.lax.conv_general_dilated`'s arguments (it
is passed to `nnx.Conv(conv_general_dilated=...)`) and returns the same values up to float
rounding (the sums run in another order), forward and under `jax.grad` / `jax.vmap`; `max_pool`
returns `flax.nnx.max_pool`'s values exactly and its gradient up to the order of sums. On GPUs
and TPUs the computation is exactly XLA's (`lax.conv_general_dilated`, cuDNN on NVIDIA;
`lax.reduce_window`). On CPU the fast forms cover what the models use: channels-last (NHWC /
HWIO) dense convs where XLA's kernel is slow (small maps, kernels no wider than their stride;
see `_dense_takes_matmul`) and depthwise convs (one filter per channel), any kernel, stride and
explicit / "SAME" / "VALID" padding; anything else (large maps, dilation, other grouped convs,
other layouts) takes XLA's convolution, unchanged.
Set PAND_NATIVE_CONV=1 to force XLA's ops everywhere, oneDNN's included; it is read when a
function is traced, so the benchmarks set it around each measurement (bench/conv_paths.py).
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from pand_jax.models import onednn

# The per-shape timings behind the thresholds below: bench/RESULTS.md, "Where the thresholds...".
# Which dense convs take the matmul form (against XLA's Eigen kernel, which `import pand_jax`
# selects): kernels no wider than their stride (the patches are the input rearranged, not
# copied); overlapping kernels only on maps of up to 4x4 outputs, where XLA's kernel falls off a
# cliff (from 7x7 the 9x patch copy costs more than the product saves); and image stems (at most
# 4 input channels) whose patches copy the input at most 2.25x, up to 32x32 outputs.
# Depthwise convs always take the shifted-product form: XLA:CPU is slow on them at every size.
SMALL_MAP = 4 * 4
IMAGE_CHANNELS, IMAGE_MAX_COPIES, IMAGE_MAX_MAP = 4, 2.25, 32 * 32


def _dense_takes_matmul(kernel, strides, out_positions, in_channels) -> bool:
    copies = math.prod(kernel) / math.prod(strides)  # how often im2col copies each input value
    return (
        copies <= 1
        or out_positions <= SMALL_MAP
        or (
            in_channels <= IMAGE_CHANNELS
            and copies <= IMAGE_MAX_COPIES
            and out_positions <= IMAGE_MAX_MAP
        )
    )


# Which convs go to oneDNN when it is there. Each custom
# call pays fixed costs the jnp forms do not (oneDNN's threads wake up, the weights are
# reordered, XLA cannot fuse BatchNorm/ReLU into it), so only large convs pay it back: dense
# convs that would otherwise take XLA's kernel (see `_dense_takes_matmul`) with at least 5e8
# multiply-adds (ResNet-18's 3x3 convs and 7x7 stem at 224 px), and depthwise convs onto maps
# of 28x28 or more (MobileNet-V2 at 224 px).
ONEDNN_MIN_MACS = 5e8
ONEDNN_MIN_DEPTHWISE_MAP = 28 * 28


def _onednn_pays(rhs_shape, batch, out_positions, *, groups, strides) -> bool:
    """For an HWIO kernel of `rhs_shape` onto `out_positions` outputs per image."""
    if groups > 1:
        return out_positions >= ONEDNN_MIN_DEPTHWISE_MAP
    macs = batch * out_positions * math.prod(rhs_shape)
    return (
        not _dense_takes_matmul(rhs_shape[:-2], strides, out_positions, rhs_shape[-2])
        and macs >= ONEDNN_MIN_MACS
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
):
    """Drop-in for `jax.lax.conv_general_dilated` (same arguments, same result)."""
    native = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
    if _xla_forced() or not _cpu_form_applies(
        lhs,
        rhs,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        out_sharding=out_sharding,
    ):
        return native(lhs, rhs)
    return _cpu_or_native(
        lhs,
        rhs,
        native,
        strides=window_strides,
        padding=padding,
        groups=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _cpu_or_native(
    lhs, rhs, native, *, strides, padding, groups, precision, preferred_element_type
):
    """On the CPU, oneDNN or a jnp form where XLA's kernel is slow; `native` everywhere else."""
    pads = (
        lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
        if isinstance(padding, str)
        else padding
    )
    use_onednn = _cpu_route(lhs.shape, rhs.shape, strides, pads, groups=groups)
    if use_onednn is None:
        return native(lhs, rhs)
    cpu = functools.partial(
        _cpu_conv,
        strides=tuple(strides),
        pads=tuple(map(tuple, pads)),
        precision=precision,
        preferred_element_type=preferred_element_type,
        groups=groups,
        use_onednn=use_onednn,
    )
    # Chosen per platform when the computation is lowered, not by a Python check of
    # jax.default_backend() while tracing: the platform XLA compiles for is what matters (a CPU
    # computation on a GPU host, or an exported function, gets the right branch), and only the
    # chosen branch reaches the compiler. It works under jit, grad and vmap like lax.switch
    # (under grad each branch returns zeros for the other's residuals; the conditional's index
    # is a constant after lowering, so XLA inlines the branch and drops them).
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=native)


def _cpu_route(lhs_shape, rhs_shape, strides, pads, *, groups) -> bool | None:
    """On the CPU: oneDNN (True), a jnp form (False), or None where XLA's kernel is faster."""
    out_positions = math.prod(_out_shape(lhs_shape, rhs_shape[:-2], strides, pads))
    # oneDNN only where this process computes on the CPU: a GPU host never builds it.
    use_onednn = (
        len(lhs_shape) == 4
        and jax.default_backend() == "cpu"
        and (
            onednn.forced()
            or _onednn_pays(rhs_shape, lhs_shape[0], out_positions, groups=groups, strides=strides)
        )
        and onednn.enabled()
    )
    if (
        not use_onednn
        and groups == 1
        and not _dense_takes_matmul(rhs_shape[:-2], strides, out_positions, lhs_shape[-1])
    ):
        return None
    return use_onednn


XLA_SWITCH = "PAND_NATIVE_CONV"


def _xla_forced() -> bool:
    return os.environ.get(XLA_SWITCH) == "1"


def _channels_last_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )


def _cpu_form_applies(
    lhs,
    rhs,
    padding,
    *,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    out_sharding,
) -> bool:
    if dimension_numbers is None or lhs.ndim < 3:
        return False
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    in_ch, out_ch = lhs.shape[-1], rhs.shape[-1]
    depthwise = feature_group_count == in_ch == out_ch and rhs.shape[-2] == 1
    return (
        numbers == _channels_last_numbers(lhs.ndim)
        and all(d == 1 for d in (lhs_dilation or ()) + tuple(rhs_dilation or ()))
        and batch_group_count == 1
        and out_sharding is None
        and (feature_group_count == 1 or depthwise)
        and (isinstance(padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in padding))
    )


def _cpu_conv(x, w, strides, pads, *, precision, preferred_element_type, groups, use_onednn):
    out_dtype = preferred_element_type or jnp.result_type(x, w)
    # Everything in fp32 at least (XLA:CPU computes bf16 convs in fp32 too): the gradient w.r.t.
    # the input sums one term per tap, which bf16 would round at every add.
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    x, w = x.astype(acc_dtype), w.astype(acc_dtype)
    if use_onednn and acc_dtype == jnp.float32:
        y = onednn.conv(x, w, strides, pads, groups=groups)
    elif (
        all(k == 1 for k in w.shape[:-2])
        and all(st == 1 for st in strides)
        and not any(map(any, pads))
    ):
        y = _pointwise(x.reshape(-1, x.shape[-1]), w.reshape(w.shape[-2:]), precision)
        y = y.reshape(*x.shape[:-1], -1)
    elif w.shape[-2] == x.shape[-1]:  # dense: im2col, one matmul over (taps x input channels)
        taps = list(_shifted_taps(x, w.shape[:-2], strides, pads))
        y = jnp.dot(jnp.concatenate(taps, axis=-1), w.reshape(-1, w.shape[-1]), precision=precision)
    else:
        y = _depthwise(x, w, strides, pads)
    return y.astype(out_dtype)


# A 1x1 conv is x [positions, C] @ w. Its own gradient, because autodiff's weight gradient
# (contracting the positions of x and dy) made XLA:CPU write dy transposed from inside the fusion
# that produces it and run a slow non-YNNPACK dot on that (67 ms for MobileNet-V2's 16->96 conv
# at 112x112); on a materialised dy both gradients are plain matmuls.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, w, precision):
    return jnp.dot(x, w, precision=precision)


def _pointwise_fwd(x, w, precision):
    return jnp.dot(x, w, precision=precision), (x, w)


def _pointwise_bwd(precision, residuals, dy):
    x, w = residuals
    dy = lax.optimization_barrier(dy)
    return (jnp.dot(dy, w.T, precision=precision), jnp.dot(x.T, dy, precision=precision))


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def _shifted_taps(x, kernel_shape, strides, pads):
    """For each kernel offset (row-major, as HWIO stores them) the strided view of the padded
    input that this kernel tap multiplies: [N, *output spatial, C] each."""
    out_shape = _out_shape(x.shape, kernel_shape, strides, pads)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    for offsets in itertools.product(*map(range, kernel_shape)):
        limit = [o + s * (m - 1) + 1 for o, s, m in zip(offsets, strides, out_shape)]
        yield lax.slice(x, (0, *offsets, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))


# Depthwise: y = sum over kernel offsets t of (the input shifted by t) * w[t], one weight per
# channel. Written with its own gradient because XLA:CPU turns the autodiff one (strided pads of
# every tap, reductions over shifted views) into loops 5-30x slower than PyTorch's kernel. Every
# read below is a unit-stride slice of a materialised array, which XLA:CPU vectorises:
# - a strided conv reads the padded input through its stride phases x[:, a::s, b::s] (copied
#   once), where each tap is a plain slice;
# - d kernel[t] = sum(phase * dy shifted to t): the shift goes on dy (a pad), never on a
#   reduction's input (a reduction over a shifted slice is the slow loop);
# - d input, per phase: the taps of that phase correlate dy (padded) with their weights; the
#   phases are then interleaved back.
# `lax.optimization_barrier` keeps a pad or phase copy from being fused into its many readers.


def _depthwise(x, w, strides, pads):
    return _depthwise_vjp(x, w, strides, pads, x.shape[1:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_vjp(x, w, strides, pads, size):
    return _depthwise_fwd(x, w, strides, pads, size)[0]


def _depthwise_fwd(x, w, strides, pads, size):
    phases = _phases(x, strides, pads)
    out = _out_shape(x.shape, w.shape[:-2], strides, pads)
    per_tap = w.reshape(-1, w.shape[-1])
    y = sum(
        _window(phases[phase], start, out) * per_tap[i]
        for i, (phase, start) in enumerate(_tap_positions(w.shape[:-2], strides))
    )
    return y, (phases, w)


def _depthwise_bwd(strides, pads, size, residuals, dy):
    phases, w = residuals
    kernel, out = w.shape[:-2], dy.shape[1:-1]
    phase_shape = next(iter(phases.values())).shape[1:-1]
    taps = list(_tap_positions(kernel, strides))
    reduce_axes = tuple(range(dy.ndim - 1))
    dw = jnp.stack(
        [
            jnp.sum(phases[phase] * _shift(dy, start, phase_shape), axis=reduce_axes)
            for phase, start in taps
        ]
    ).reshape(w.shape)

    # Phase p of d input at u: sum over its taps t of dy[u - start_t] * w[t]; dy padded by the
    # largest start so that every term is a plain slice.
    reach = [max(start[d] for _, start in taps) for d in range(len(kernel))]
    dy_padded = lax.optimization_barrier(
        jnp.pad(dy, ((0, 0), *((r, p - o) for r, p, o in zip(reach, phase_shape, out)), (0, 0)))
    )
    per_tap = w.reshape(-1, w.shape[-1])
    d_phase = {phase: jnp.zeros_like(x) for phase, x in phases.items()}  # a phase may have no tap
    for i, (phase, start) in enumerate(taps):
        d_phase[phase] = (
            d_phase[phase]
            + _window(dy_padded, [r - s for r, s in zip(reach, start)], phase_shape) * per_tap[i]
        )
    return _unphase(d_phase, strides, pads, size), dw


_depthwise_vjp.defvjp(_depthwise_fwd, _depthwise_bwd)


def max_pool(x, window, strides, padding):
    """Max pooling over the spatial axes of [N, *spatial, C] with explicit (lo, hi) padding that
    never wins (-inf, as PyTorch's MaxPool2d pads): `flax.nnx.max_pool`'s result. On CPU through
    stride phases with its own gradient; elsewhere XLA's reduce_window."""
    window, strides = tuple(window), tuple(strides)
    pads = tuple(map(tuple, padding))

    def native(x):
        return lax.reduce_window(
            x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
        )

    if _xla_forced():
        return native(x)
    return lax.platform_dependent(
        x, cpu=lambda x: _max_pool_vjp(x, window, strides, pads, x.shape[1:-1]), default=native
    )


# Max pool: y = max over kernel offsets t of the input shifted by t, read from the stride phases
# like the depthwise conv. XLA:CPU's own gradient of reduce_window (select-and-scatter through
# index arrays of the padded input's size) took a quarter of a ResNet-18 training step. Here the
# forward records, per output, the first tap in row-major order that attains the max (int8):
# that tap gets the gradient, as in XLA's select-and-scatter and PyTorch's max_pool2d. The
# gradient of each phase is then a sum of masked, shifted dy, all unit-stride slices.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_vjp(x, window, strides, pads, size):
    return _max_pool_fwd(x, window, strides, pads, size)[0]


def _max_pool_fwd(x, window, strides, pads, size):
    phases = _phases(x, strides, pads, fill=-jnp.inf)
    out = _out_shape(x.shape, window, strides, pads)
    taps = [_window(phases[phase], start, out) for phase, start in _tap_positions(window, strides)]
    y = functools.reduce(jnp.maximum, taps)
    first = jnp.full(y.shape, len(taps) - 1, jnp.int8)
    for t in reversed(range(len(taps) - 1)):
        first = jnp.where(taps[t] == y, jnp.int8(t), first)
    return y, first


def _max_pool_bwd(window, strides, pads, size, first, dy):
    phase_shape = _phase_shape(size, strides, pads)
    taps = list(_tap_positions(window, strides))
    reach = [max(start[d] for _, start in taps) for d in range(len(window))]
    spread = ((0, 0), *((r, p - o) for r, p, o in zip(reach, phase_shape, dy.shape[1:-1])), (0, 0))
    dy_padded = lax.optimization_barrier(jnp.pad(dy, spread))
    first_padded = lax.optimization_barrier(jnp.pad(first, spread, constant_values=-1))
    d_phase = {
        phase: jnp.zeros((dy.shape[0], *phase_shape, dy.shape[-1]), dy.dtype)
        for phase in itertools.product(*map(range, strides))
    }
    for t, (phase, start) in enumerate(taps):
        at = [r - s for r, s in zip(reach, start)]
        d_phase[phase] = d_phase[phase] + jnp.where(
            _window(first_padded, at, phase_shape) == t, _window(dy_padded, at, phase_shape), 0
        )
    return (_unphase(d_phase, strides, pads, size),)


_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)


def _out_shape(x_shape, kernel, strides, pads):
    return [
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(x_shape[1:-1], kernel, strides, pads)
    ]


def _tap_positions(kernel, strides):
    """Per kernel offset (row-major, as HWIO stores them): its stride phase and its start
    within that phase."""
    for offsets in itertools.product(*map(range, kernel)):
        yield (
            tuple(o % s for o, s in zip(offsets, strides)),
            tuple(o // s for o, s in zip(offsets, strides)),
        )


def _phases(x, strides, pads, fill=0):
    """The input padded with `fill` and split into its stride phases {(a, b): xp[:, a::s, b::s]},
    each materialised, all of one shape (the padding is rounded up to a multiple of the
    stride)."""
    size = x.shape[1:-1]
    shape = _phase_shape(size, strides, pads)
    xp = jnp.pad(
        x,
        (
            (0, 0),
            *((lo, m * s - n - lo) for n, m, s, (lo, _) in zip(size, shape, strides, pads)),
            (0, 0),
        ),
        constant_values=fill,
    )
    return {
        phase: lax.optimization_barrier(
            xp[(slice(None), *(slice(a, None, s) for a, s in zip(phase, strides)))]
        )
        for phase in itertools.product(*map(range, strides))
    }


def _phase_shape(size, strides, pads):
    """The spatial shape of each stride phase of the padded input (padding rounded up)."""
    return [-(-(n + lo + hi) // s) for n, s, (lo, hi) in zip(size, strides, pads)]


def _window(x, start, size):
    return lax.slice(
        x, (0, *start, 0), (x.shape[0], *(a + m for a, m in zip(start, size)), x.shape[-1])
    )


def _shift(dy, start, shape):
    """dy placed at `start` in zeros of spatial `shape`."""
    return jnp.pad(
        dy, ((0, 0), *((a, n - a - m) for a, n, m in zip(start, shape, dy.shape[1:-1])), (0, 0))
    )


def _unphase(d_phase, strides, pads, size):
    """Interleaves the phases back into the padded input's grid and drops the padding."""
    first = next(iter(d_phase.values()))
    batch, phase_shape, channels = first.shape[0], first.shape[1:-1], first.shape[-1]
    stacked = jnp.stack([d_phase[p] for p in itertools.product(*map(range, strides))])
    rank = len(strides)
    stacked = stacked.reshape(*strides, batch, *phase_shape, channels)
    # [s1, s2, N, P1, P2, C] -> [N, P1, s1, P2, s2, C]: phase (a, b) at u lands at u * s + a.
    order = (
        rank,
        *itertools.chain.from_iterable((rank + 1 + d, d) for d in range(rank)),
        2 * rank + 1,
    )
    grid = stacked.transpose(order).reshape(
        batch, *(p * s for p, s in zip(phase_shape, strides)), channels
    )
    return grid[(slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(pads, size)))]
