"""The CPU convolution paths the benchmarks compare, and a context that traces with one.

`pand_jax.models.conv` reads its switches (PAND_NATIVE_CONV, PAND_ONEDNN) when a function is
traced, so a measurement sets them around a fresh trace (jit caches traces: functions traced
before are not affected)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pand_jax.models import conv, onednn

CPU_PATHS = {
    "native": "XLA's convolution and pooling",
    "jnp": "the jnp forms (no oneDNN)",
    "fast": "pand_jax.models.conv as it runs",
}
_SWITCHES = {"native": {conv.XLA_SWITCH: "1"}, "jnp": {onednn.SWITCH: "0"}, "fast": {}}


@contextlib.contextmanager
def traced_with(path: str) -> Iterator[None]:
    """Functions traced afresh inside use the CPU path `path` (a key of `CPU_PATHS`)."""
    switches = _SWITCHES[path]
    before = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
