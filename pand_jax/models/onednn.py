"""oneDNN's convolutions, the CPU kernels PyTorch runs, inside XLA:CPU computations.

Why: XLA:CPU's own convolution kernel (Eigen) is 10-40 % slower than oneDNN's on the 3x3 convs
of a ResNet (at 56x56 over 64 channels, batch 16: forward / input gradient / weight gradient
10-15 / 10-15 / 12-27 ms against oneDNN's 7.2 / 7.4 / 8.3) and far slower on depthwise and
strided ones, and no XLA option or rewriting in jnp closed that (bench/RESULTS.md). oneDNN is a
well-kept library with pip wheels, so the kernels are called, not rewritten.

How: `onednn_conv.cc` (next to this file) binds oneDNN's forward, input-gradient and
weight-gradient convolutions to XLA's FFI. On first use it is compiled with the C++ compiler
(`$CXX`, default g++, about 3 s) against the oneDNN wheels (`onednn-cpu-gomp`,
`onednn-devel-cpu-gomp`, dependencies of this package on x86-64 Linux) and JAX's FFI headers,
cached under `$XDG_CACHE_HOME/pand_jax` (default ~/.cache) by a hash of the source and the
versions, and registered as CPU custom calls. `conv` is differentiable through its own VJP
(the two gradient kernels) and vmaps one example at a time.

When it is not there (another CPU architecture, no compiler, the wheels missing) `available()`
says so in one warning and `pand_jax.models.conv` keeps its jnp forms: the same values, slower.
`pand_jax.models.conv` decides which convs go to oneDNN (where measured faster than its jnp
forms); PAND_ONEDNN=0 turns oneDNN off (the benchmarks use it to measure the difference),
PAND_ONEDNN=all sends it every conv it can run. Both are read when a function is traced.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pand_jax import files

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
SWITCH = "PAND_ONEDNN"
_TARGETS = {
    "forward": "PandConvForward",
    "input_grad": "PandConvInputGrad",
    "weight_grad": "PandConvWeightGrad",
}


class BuildError(RuntimeError):
    pass


MODES = {"1": "where it is faster (the default)", "0": "never", "all": "every conv it can run"}


def mode() -> str:
    value = os.environ.get(SWITCH, "1")
    if value not in MODES:
        raise ValueError(
            f"{SWITCH}={value!r}; expected one of: "
            + ", ".join(f"{k} ({v})" for k, v in MODES.items())
        )
    return value


def enabled() -> bool:
    """Whether CPU convolutions may go to oneDNN: not switched off, and it builds here."""
    return mode() != "0" and available()


def forced() -> bool:
    """PAND_ONEDNN=all: every conv oneDNN can run goes to it (the tests' parity checks)."""
    return mode() == "all"


@functools.cache
def available() -> bool:
    """Builds (once per machine), loads and registers the custom calls; False, with a warning
    naming the reason, when that cannot be done here."""
    try:
        library = ctypes.CDLL(str(_build()))
    except (BuildError, OSError) as e:
        warnings.warn(
            f"oneDNN convolutions unavailable ({e}); CPU convolutions use "
            "pand_jax's slower jnp forms (same results)",
            stacklevel=2,
        )
        return False
    for target in _TARGETS.values():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu"
        )
    return True


def _wheel_file(distribution: str, suffix: str) -> pathlib.Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            f"the {distribution} wheel is not installed (pip install {distribution})"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return pathlib.Path(dist.locate_file(f)).resolve()
    raise BuildError(f"{distribution} has no {suffix}")


def _build() -> pathlib.Path:
    library = _wheel_file("onednn-cpu-gomp", "/libdnnl.so")
    header = _wheel_file("onednn-devel-cpu-gomp", "include/dnnl.hpp")
    compiler = os.environ.get("CXX", "g++")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                str(library).encode(),
                importlib.metadata.version("onednn-cpu-gomp").encode(),
                importlib.metadata.version("jaxlib").encode(),
                compiler.encode(),
            ]
        )
    ).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    target = cache / "pand_jax" / f"onednn_conv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Whole or absent, when several processes build at once.
    with files.atomic_path(target) as built:
        command = [
            compiler,
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-w",
            f"-I{header.parent}",
            f"-I{jax.ffi.include_dir()}",
            str(SOURCE),
            f"-L{library.parent}",
            "-ldnnl",
            f"-Wl,-rpath,{library.parent}",
            "-o",
            str(built),
        ]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise BuildError(f"no C++ compiler {compiler!r} (set CXX)") from None
        except subprocess.CalledProcessError as e:
            last = (e.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"{compiler} exited with status {e.returncode}: {last}") from None
    return target


def conv(x, w, strides, pads, *, groups):
    """`lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups)` for fp32 x [N, H, W, C], w [KH, KW, C / groups, O] and explicit
    (lo, hi) padding, computed by oneDNN. Needs `enabled()`."""
    return _conv(x, w, tuple(strides), tuple(map(tuple, pads)), groups)


def _call(pass_, shape, a, b, *, strides, pads, groups):
    return jax.ffi.ffi_call(
        _TARGETS[pass_], jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential"
    )(
        a,
        b,
        strides=np.array(strides, np.int64),
        padding=np.array([p for pair in pads for p in pair], np.int64),
        groups=np.int64(groups),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, groups):
    out = [
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(x.shape[1:3], w.shape[:2], strides, pads)
    ]
    shape = (x.shape[0], *out, w.shape[-1])
    return _call("forward", shape, x, w, strides=strides, pads=pads, groups=groups)


def _conv_fwd(x, w, strides, pads, groups):
    return _conv(x, w, strides, pads, groups), (x, w)


def _conv_bwd(strides, pads, groups, residuals, dy):
    x, w = residuals
    return (
        _call("input_grad", x.shape, dy, w, strides=strides, pads=pads, groups=groups),
        _call("weight_grad", w.shape, x, dy, strides=strides, pads=pads, groups=groups),
    )


_conv.defvjp(_conv_fwd, _conv_bwd)
