"""`pand_jax.models.conv.conv_general_dilated` against `jax.lax.conv_general_dilated`, and its
`max_pool` against `flax.nnx.max_pool`.

Every convolution shape the students and the teacher use, forward and gradients (w.r.t. input
and kernel), odd sizes, bf16, under jit and vmap, through both CPU paths (oneDNN's kernels and
the jnp forms used without them); and that only CPU lowerings use either. Tolerances: fp32
|ours - lax| <= 1e-5 * max|lax| (the sums run in another order; float32 eps is 1.2e-7 and a sum
of up to 7*7*64 terms stays far below 1e-5 relative); bf16 (bf16 in and out, as lax) within one
bf16 rounding (2^-8 relative) of max|exact|, exact being lax's fp32 result on the same
bf16-valued operands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from pand_jax.models import conv as conv_module
from pand_jax.models import onednn
from pand_jax.models.conv import conv_general_dilated, max_pool

NHWC = ("NHWC", "HWIO", "NHWC")
FP32_TOL = 1e-5
BF16_TOL = 2.0**-8

# (name, in channels, out channels, kernel, stride, padding, depthwise)
MODEL_CONVS = [
    ("resnet18 stem 7x7/2", 3, 8, 7, 2, 3, False),
    ("resnet18 3x3/1", 8, 8, 3, 1, 1, False),
    ("resnet18 3x3/2", 8, 16, 3, 2, 1, False),
    ("resnet18 downsample 1x1/2", 8, 16, 1, 2, 0, False),
    ("mobilenet_v2 stem 3x3/2", 3, 8, 3, 2, 1, False),
    ("mobilenet_v2 1x1 expand/project", 8, 12, 1, 1, 0, False),
    ("mobilenet_v2 depthwise 3x3/1", 12, 12, 3, 1, 1, True),
    ("mobilenet_v2 depthwise 3x3/2", 12, 12, 3, 2, 1, True),
    ("convnext stem 4x4/4", 3, 8, 4, 4, "VALID", False),
    ("convnext downsample 2x2/2", 8, 16, 2, 2, "VALID", False),
    ("convnext depthwise 7x7", 8, 8, 7, 1, 3, True),
]
# Not in the models, but in the depthwise gradient's reach: a stride phase that no tap reads.
EDGE_CONVS = [("depthwise 1x1/2", 4, 4, 1, 2, 0, True)]
SIZES = (4, 13, 20)  # even and odd (13 leaves a remainder for every stride above); dense 3x3
# and 7x7 kernels take the matmul form at 4 (4x4 outputs at most) and XLA's kernel at 13 and 20


@pytest.fixture(params=["onednn", "jnp"])
def cpu_path(request, monkeypatch):
    """The CPU convolution path under test: oneDNN's kernels (for every conv, as small as
    these), or the jnp forms."""
    monkeypatch.setenv(onednn.SWITCH, "all" if request.param == "onednn" else "0")
    if request.param == "onednn":
        assert onednn.enabled(), "oneDNN must build here: the test setup installs its wheels"
    return request.param


@pytest.fixture
def jnp_forms(monkeypatch):
    monkeypatch.setenv(onednn.SWITCH, "0")


def operands(cin, cout, k, depthwise, size, dtype=jnp.float32, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = rng.standard_normal((k, k, 1 if depthwise else cin, cout), np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def both(cin, stride, pad, depthwise):
    """(ours, lax) with the arguments nnx.Conv passes."""
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    kwargs = dict(
        window_strides=(stride, stride),
        padding=padding,
        lhs_dilation=(1, 1),
        rhs_dilation=(1, 1),
        dimension_numbers=lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), NHWC),
        feature_group_count=cin if depthwise else 1,
        precision=None,
    )
    return (
        lambda x, w: conv_general_dilated(x, w, **kwargs),
        lambda x, w: lax.conv_general_dilated(x, w, **kwargs),
    )


def assert_close(ours, ref, tol):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= tol * np.abs(ref).max(), (
        f"max |diff| {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"
    )


def forward_and_grads(f, x, w, cotangent_seed=1):
    y, vjp = jax.vjp(f, x, w)
    # bf16-valued in every dtype, so that bf16 and fp32 runs see the same cotangent
    ct = jnp.asarray(np.random.default_rng(cotangent_seed).standard_normal(y.shape), jnp.bfloat16)
    ct = ct.astype(y.dtype)
    return (y, *vjp(ct))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "name,cin,cout,k,stride,pad,depthwise",
    MODEL_CONVS + EDGE_CONVS,
    ids=[c[0] for c in MODEL_CONVS + EDGE_CONVS],
)
def test_model_convs_match_lax_forward_and_grads(
    name, cin, cout, k, stride, pad, depthwise, size, cpu_path
):
    ours, ref = both(cin, stride, pad, depthwise)
    x, w = operands(cin, cout, k, depthwise, size)
    got = jax.jit(lambda x, w: forward_and_grads(ours, x, w))(x, w)
    want = jax.jit(lambda x, w: forward_and_grads(ref, x, w))(x, w)
    for g, r, what in zip(got, want, ("output", "d input", "d kernel")):
        assert g.dtype == r.dtype, what
        assert_close(g, r, FP32_TOL)


@pytest.mark.parametrize(
    "name,cin,cout,k,stride,pad,depthwise",
    [
        c
        for c in MODEL_CONVS
        if c[0] in ("resnet18 3x3/2", "mobilenet_v2 depthwise 3x3/2", "convnext stem 4x4/4")
    ],
)
def test_bf16_within_bf16_rounding_of_exact(name, cin, cout, k, stride, pad, depthwise, cpu_path):
    """bf16 in, bf16 out like lax; each result within bf16 rounding of the fp32 computation on
    the same (bf16-valued) operands."""
    ours, ref = both(cin, stride, pad, depthwise)
    x, w = operands(cin, cout, k, depthwise, 8, jnp.bfloat16)  # 4x4 outputs: the matmul form
    got = forward_and_grads(ours, x, w)
    exact = forward_and_grads(ref, x.astype(jnp.float32), w.astype(jnp.float32))
    for g, r, e in zip(got, forward_and_grads(ref, x, w), exact):
        assert g.dtype == r.dtype == jnp.bfloat16
        assert_close(g, e, BF16_TOL)


def test_vmap_over_input_and_kernel(cpu_path):
    """A vmapped conv (e.g. an ensemble of kernels) matches vmapped lax, forward and grads."""
    for k, stride, pad, depthwise in ((3, 2, 1, False), (1, 1, 0, False), (3, 2, 1, True)):
        ours, ref = both(8, stride, pad, depthwise)
        xs, ws = zip(*(operands(8, 8, k, depthwise, 7, seed=s) for s in range(3)))
        xs, ws = jnp.stack(xs), jnp.stack(ws)
        got = jax.jit(jax.vmap(lambda x, w, ours=ours: forward_and_grads(ours, x, w)))(xs, ws)
        want = jax.vmap(lambda x, w, ref=ref: forward_and_grads(ref, x, w))(xs, ws)
        for g, r in zip(got, want):
            assert_close(g, r, FP32_TOL)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_rectangular_kernel_strides_and_uneven_padding(depthwise, cpu_path):
    """Height and width apart: a 3x5 kernel, strides (2, 1), padding (0, 1) and (2, 1)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 4), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 5, 1 if depthwise else 4, 4), np.float32))
    kwargs = dict(
        window_strides=(2, 1),
        padding=((0, 1), (2, 1)),
        dimension_numbers=NHWC,
        feature_group_count=4 if depthwise else 1,
    )
    got = jax.jit(
        lambda x, w: forward_and_grads(lambda x, w: conv_general_dilated(x, w, **kwargs), x, w)
    )(x, w)
    want = forward_and_grads(lambda x, w: lax.conv_general_dilated(x, w, **kwargs), x, w)
    for g, r in zip(got, want):
        assert_close(g, r, FP32_TOL)


def test_same_padding_and_preferred_element_type(cpu_path):
    x, w = operands(4, 6, 3, False, 7, jnp.bfloat16)
    kwargs = dict(
        window_strides=(2, 2),
        padding="SAME",
        dimension_numbers=NHWC,
        preferred_element_type=jnp.float32,
    )
    got = conv_general_dilated(x, w, **kwargs)
    want = lax.conv_general_dilated(x, w, **kwargs)
    assert got.dtype == want.dtype == jnp.float32
    assert_close(got, want, FP32_TOL)


def test_unsupported_configuration_falls_back_to_lax():
    """Dilation and grouped (not depthwise) convs are XLA's convolution, result unchanged."""
    x, _ = operands(8, 8, 3, False, 9)
    for w, kwargs in (
        (operands(8, 8, 3, False, 9)[1], dict(rhs_dilation=(2, 2))),
        (operands(4, 8, 3, False, 9)[1], dict(feature_group_count=2)),
    ):
        args = (x, w, (1, 1), ((1, 1), (1, 1)))
        hlo = (
            jax.jit(
                lambda x, w, args=args, kwargs=kwargs: conv_general_dilated(
                    x, w, *args[2:], dimension_numbers=NHWC, **kwargs
                )
            )
            .lower(x, w)
            .as_text()
        )
        assert "convolution" in hlo and "dot_general" not in hlo
        np.testing.assert_array_equal(
            conv_general_dilated(*args, dimension_numbers=NHWC, **kwargs),
            lax.conv_general_dilated(*args, dimension_numbers=NHWC, **kwargs),
        )


def lowered_train_step(platform: str) -> str:
    """StableHLO of a grad step through nnx.Conv (dense and depthwise), lowered for `platform`."""
    dense = nnx.Conv(
        4,
        4,
        (3, 3),
        padding=((1, 1), (1, 1)),
        conv_general_dilated=conv_general_dilated,
        rngs=nnx.Rngs(0),
    )
    dw = nnx.Conv(
        4,
        4,
        (3, 3),
        padding=((1, 1), (1, 1)),
        feature_group_count=4,
        conv_general_dilated=conv_general_dilated,
        rngs=nnx.Rngs(0),
    )
    graphdef, state = nnx.split(nnx.List([dense, dw]))

    def loss(state, x):
        a, b = nnx.merge(graphdef, state)
        return jnp.sum(b(a(x)) ** 2)

    x = jnp.ones((2, 4, 4, 4))  # 4x4 maps: the dense conv takes the matmul form on CPU
    return jax.jit(jax.grad(loss)).trace(state, x).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_accelerators_get_xla_convolution(platform, cpu_path):
    hlo = lowered_train_step(platform)
    assert "stablehlo.convolution" in hlo
    # nothing of the CPU paths reaches an accelerator compiler
    assert "dot_general" not in hlo and "PandConv" not in hlo


def test_cpu_gets_onednn_for_every_pass(monkeypatch):
    monkeypatch.setenv(onednn.SWITCH, "all")
    assert onednn.enabled()
    hlo = lowered_train_step("cpu")
    assert "stablehlo.convolution" not in hlo and "dot_general" not in hlo
    # the dense conv and the depthwise one; only the second needs its input's gradient
    counts = {"PandConvForward": 2, "PandConvInputGrad": 1, "PandConvWeightGrad": 2}
    assert {target: hlo.count(f"@{target}(") for target in counts} == counts


def test_cpu_gets_matmul_form_and_env_switch_restores_native(monkeypatch, jnp_forms):
    hlo = lowered_train_step("cpu")
    assert "stablehlo.convolution" not in hlo and "dot_general" in hlo
    monkeypatch.setenv("PAND_NATIVE_CONV", "1")
    hlo = lowered_train_step("cpu")
    assert "stablehlo.convolution" in hlo and "dot_general" not in hlo


def test_models_use_the_module():
    """Every conv of both students and the teacher goes through this module."""
    from pand_jax.convert.open_clip import config_from_open_clip
    from pand_jax.models.clip import CLIP
    from pand_jax.models.student import Student

    build = [
        lambda: Student("resnet18", 3, rngs=nnx.Rngs(0)),
        lambda: Student("mobilenet_v2", 3, rngs=nnx.Rngs(0)),
        lambda: CLIP(config_from_open_clip("pand_demo_convnext"), rngs=nnx.Rngs(0)).visual,
    ]
    models = [nnx.eval_shape(b) for b in build]  # structure only, no weights
    for model in models:
        convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
        assert convs and all(
            c.conv_general_dilated is conv_module.conv_general_dilated for c in convs
        )


@pytest.mark.parametrize(
    "size,channels,kernel,stride,groups,native",
    [
        (17, 4, 3, 1, 1, True),  # 17x17 outputs: past every small-map rule
        (16, 64, 3, 1, 1, True),  # 16x16 outputs: XLA's kernel at any width
        (10, 512, 3, 2, 1, True),  # 5x5 outputs: XLA's kernel
        (8, 512, 3, 2, 1, False),  # 4x4 outputs: matmul at any width
        (17, 4, 1, 1, 1, False),  # 1x1: a plain matmul at every size
        (34, 4, 2, 2, 1, False),  # 2x2/2 (kernel = stride): the input rearranged, any size
        (64, 3, 3, 2, 1, False),  # MobileNet-V2's image stem 3x3/2 at 64 px (32x32): matmul
        (224, 3, 3, 2, 1, True),  # the same at 224 px (112x112 outputs): XLA's
        (64, 3, 7, 2, 1, True),  # ResNet-18's image stem 7x7/2 (12x patch copies): XLA's
        (17, 4, 3, 1, 4, False),  # depthwise: shifted products at every size
    ],
)
def test_cpu_form_selection(size, channels, kernel, stride, groups, native, jnp_forms):
    x = jnp.ones((1, size, size, channels))
    w = jnp.ones((kernel, kernel, channels // groups, channels))
    hlo = (
        jax.jit(
            lambda x, w: conv_general_dilated(
                x, w, (stride, stride), "SAME", dimension_numbers=NHWC, feature_group_count=groups
            )
        )
        .trace(x, w)
        .lower(lowering_platforms=("cpu",))
        .as_text()
    )
    assert ("stablehlo.convolution" in hlo) == native


def pools(window, stride, pad):
    padding = ((pad, pad), (pad, pad))
    return (
        lambda x: max_pool(x, (window, window), (stride, stride), padding),
        lambda x: nnx.max_pool(x, (window, window), strides=(stride, stride), padding=padding),
    )


@pytest.mark.parametrize("size", (8, 13, 20))
@pytest.mark.parametrize(
    "window,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1)], ids=["resnet18 3x3/2", "2x2/2", "3x3/1"]
)
def test_max_pool_matches_flax_including_ties(window, stride, pad, size):
    """Forward bit-equal; the gradient goes to the first maximum of each window in row-major
    order, as XLA's (and PyTorch's): after a ReLU most windows tie at 0, and one position below
    ties at the maximum, so ties are exercised. Each input sums up to window^2 / stride^2
    cotangents in another order: within fp32 rounding (1e-6 of max |d input|)."""
    ours, ref = pools(window, stride, pad)
    x = np.maximum(np.random.default_rng(size).standard_normal((2, size, size, 3), np.float32), 0)
    x[0, 2, 2, 0] = x[0, 2, 3, 0] = x[0, 3, 2, 0] = 9.0
    x = jnp.asarray(x)
    (y, vjp), (y_ref, vjp_ref) = jax.vjp(jax.jit(ours), x), jax.vjp(ref, x)
    np.testing.assert_array_equal(y, y_ref)
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    (dx,), (dx_ref,) = vjp(ct), vjp_ref(ct)
    np.testing.assert_array_equal(dx != 0, dx_ref != 0)  # same winners
    assert_close(dx, dx_ref, 1e-6)


def test_max_pool_under_vmap_bf16_and_platforms():
    ours, ref = pools(3, 2, 1)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 9, 9, 4)), jnp.bfloat16)
    np.testing.assert_array_equal(jax.jit(jax.vmap(ours))(xs), jax.vmap(ref)(xs))
    grad = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(ours(x).astype(jnp.float32) ** 2))))
    grad_ref = jax.vmap(jax.grad(lambda x: jnp.sum(ref(x).astype(jnp.float32) ** 2)))
    np.testing.assert_array_equal(grad(xs), grad_ref(xs))  # one cotangent per input here
    for platform, native in (("cpu", False), ("cuda", True), ("tpu", True)):
        hlo = (
            jax.jit(jax.grad(lambda x: jnp.sum(ours(x) ** 2)))
            .trace(xs[0].astype(jnp.float32))
            .lower(lowering_platforms=(platform,))
            .as_text()
        )
        for op in ("reduce_window", "select_and_scatter"):  # XLA's forward and its gradient
            assert (op in hlo) == native, (platform, op)


START_SCRIPT = """
import json, os
import numpy as np
import pand_jax
before = os.environ["XLA_FLAGS"]  # importing the package changes nothing
from pand_jax import cli
cli.start()  # what every tool does first: XLA:CPU's option, before JAX starts a backend
import jax
from jax import lax
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 30, 30, 16), np.float32)
w = rng.standard_normal((3, 3, 16, 8), np.float32)
y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
ref = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + 30, j:j + 30], w[i, j])
          for i in range(3) for j in range(3))
print(json.dumps({"before": before, "flags": os.environ["XLA_FLAGS"],
                  "devices": jax.device_count(),
                  "err": float(np.abs(np.asarray(y) - ref).max() / np.abs(ref).max())}))
"""


@pytest.mark.parametrize(
    "user_flags,want",
    [
        (
            "--xla_force_host_platform_device_count=2",
            "--xla_force_host_platform_device_count=2 "
            "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
        ),
        ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_experimental_ynn_fusion_type="),
    ],
)
def test_tools_set_the_xla_cpu_convolution_option(user_flags, want):
    """Importing pand_jax leaves XLA_FLAGS alone; a tool's start (`pand_jax.cli.start`) adds
    XLA's option for Eigen convolutions to the user's XLA_FLAGS (kept, and still in force: 2
    devices) unless the user set that option; the installed jaxlib accepts it (XLA aborts the
    process on an unknown option or value), and XLA's convolution (30x30 maps take XLA's kernel)
    under it equals a float64 NumPy reference to fp32 rounding. GLIBC_TUNABLES set: no restart
    for huge pages, so the script runs once."""
    env = {
        **os.environ,
        "XLA_FLAGS": user_flags,
        "JAX_PLATFORMS": "cpu",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0",
    }
    proc = subprocess.run(
        [sys.executable, "-c", START_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["before"] == user_flags
    assert got["flags"] == want
    assert got["devices"] == (2 if "device_count=2" in user_flags else 1)
    assert got["err"] <= FP32_TOL, got["err"]


def test_the_option_after_jax_ran_warns_that_it_came_too_late():
    script = (
        "import jax; jax.numpy.ones(1); from pand_jax import xla_cpu; "
        "xla_cpu.prefer_eigen_convolutions()"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "before any computation" in proc.stderr, proc.stderr[-2000:]


FALLBACK_SCRIPT = """
import json, warnings
import numpy as np
import jax
from jax import lax
from pand_jax.models.conv import conv_general_dilated
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 9, 9, 8), np.float32)
w = rng.standard_normal((3, 3, 8, 8), np.float32)
args = ((1, 1), ((1, 1), (1, 1)))
dn = ("NHWC", "HWIO", "NHWC")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    f = jax.jit(jax.grad(
        lambda x, w: (conv_general_dilated(x, w, *args, dimension_numbers=dn) ** 2).sum(), (0, 1)
    ))
    hlo = f.lower(x, w).as_text()
got = f(x, w)
want = jax.grad(
    lambda x, w: (lax.conv_general_dilated(x, w, *args, dimension_numbers=dn) ** 2).sum(), (0, 1)
)(x, w)
err = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, want))
print(json.dumps({"warnings": [str(c.message) for c in caught], "onednn": "PandConv" in hlo,
                  "err": err}))
"""


@pytest.mark.parametrize(
    "breakage,reason",
    [
        ({"CXX": "no-such-compiler"}, "no C++ compiler 'no-such-compiler' (set CXX)"),
        ({"CXX": "false"}, "false exited with status 1: no output"),
    ],
)
def test_without_onednn_one_warning_and_the_jnp_forms(tmp_path, breakage, reason):
    """When oneDNN cannot be built here (no compiler, a failed build), one warning names the
    reason and the convolutions take the jnp forms, whose values equal lax's."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XDG_CACHE_HOME": str(tmp_path),
        onednn.SWITCH: "all",
        **breakage,
    }
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["warnings"] == [
        f"oneDNN convolutions unavailable ({reason}); CPU convolutions "
        "use pand_jax's slower jnp forms (same results)"
    ]
    assert not got["onednn"] and got["err"] <= FP32_TOL
    assert not (tmp_path / "pand_jax").exists() or not any((tmp_path / "pand_jax").iterdir())


@pytest.mark.parametrize(
    "batch,size,cin,cout,kernel,stride,groups,want",
    [
        (16, 56, 64, 64, 3, 1, 1, "onednn"),  # ResNet-18 at 224 px: 1.85e9 multiply-adds
        (16, 224, 3, 64, 7, 2, 1, "onednn"),  # its stem at 224 px: 1.9e9
        (16, 64, 3, 64, 7, 2, 1, "xla"),  # its stem at 64 px: 1.5e8, XLA's kernel
        (16, 16, 64, 64, 3, 1, 1, "xla"),  # ResNet-18 at 64 px: 1.5e8
        (2, 56, 64, 64, 3, 1, 1, "xla"),  # the 224 px conv at batch 2: 2.3e8
        (16, 4, 512, 512, 3, 1, 1, "jnp"),  # a 4x4 map: the matmul form
        (16, 56, 64, 256, 1, 1, 1, "jnp"),  # 1x1: a matmul at any size
        (16, 28, 192, 192, 3, 1, 192, "onednn"),  # depthwise onto 28x28
        (16, 27, 192, 192, 3, 1, 192, "jnp"),  # depthwise onto 27x27: shifted products
        (16, 112, 96, 96, 3, 2, 96, "onednn"),  # depthwise 3x3/2 onto 56x56
    ],
)
def test_onednn_selection(batch, size, cin, cout, kernel, stride, groups, want):
    x = jax.ShapeDtypeStruct((batch, size, size, cin), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, cin // groups, cout), jnp.float32)
    hlo = (
        jax.jit(
            lambda x, w: conv_general_dilated(
                x, w, (stride, stride), "SAME", dimension_numbers=NHWC, feature_group_count=groups
            )
        )
        .trace(x, w)
        .lower(lowering_platforms=("cpu",))
        .as_text()
    )
    got = (
        "onednn" if "PandConvForward" in hlo else "xla" if "stablehlo.convolution" in hlo else "jnp"
    )
    assert got == want


def test_bad_onednn_switch_is_named(monkeypatch):
    monkeypatch.setenv(onednn.SWITCH, "yes")
    with pytest.raises(ValueError, match="PAND_ONEDNN='yes'; expected one of: 1 .*, 0 .*, all"):
        conv_general_dilated(
            jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), "SAME", dimension_numbers=NHWC
        )
