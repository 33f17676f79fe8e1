"""The one XLA:CPU compiler option pand_jax sets, and why.

XLA:CPU sends dense convolutions to YNNPACK by default; in jaxlib 0.10 that kernel is about 2x
slower than XLA's Eigen convolution on ResNet-18's 56x56 maps (3x3 64->64, batch 16: 17.6 vs
11.4 ms forward, 78 vs 49 ms with its gradients) and whole 224 px training steps took 20-25 %
longer; in jaxlib 0.11 and 0.12 both run whole steps equally fast (bench/RESULTS.md), and
`pand_jax.models.conv` picks its CPU forms for Eigen's kernel. The option changes nothing on GPUs
and TPUs.

XLA reads XLA_FLAGS when JAX first starts a backend, so the command-line tools and the bench
scripts set it first thing (`pand_jax.cli.start`); importing pand_jax as a library changes no
environment variable (call `prefer_eigen_convolutions` before the first computation to get the
same kernels). A value the user set is kept. XLA aborts the process on an option it does not
know: every jaxlib pyproject.toml allows knows this one, and a newer one is left alone.
"""

import importlib.metadata
import os
import sys
import warnings

YNN_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
YNN_KNOWN_UP_TO = (0, 12)


def _jaxlib_minor() -> tuple[int, int]:
    try:
        return tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _cpu_backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")  # only if JAX is imported already
    return (
        bridge is not None
        and getattr(bridge, "backends_are_initialized", lambda: False)()
        and sys.modules["jax"].default_backend() == "cpu"
    )


def prefer_eigen_convolutions() -> None:
    """Adds the option for XLA's Eigen convolutions to XLA_FLAGS, unless it is there already or
    the installed jaxlib may not know it; warns when JAX's CPU backend started before."""
    if YNN_OPTION in os.environ.get("XLA_FLAGS", "") or _jaxlib_minor() > YNN_KNOWN_UP_TO:
        return
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), f"{YNN_OPTION}=-individual_convolution"])
    )
    if _cpu_backend_started():
        warnings.warn(
            "JAX ran before pand_jax set its XLA:CPU option, so XLA:CPU keeps its slower "
            "convolution kernel; call pand_jax.xla_cpu.prefer_eigen_convolutions() before any "
            "computation for CPU speed (results agree to float rounding either way)",
            stacklevel=2,
        )
