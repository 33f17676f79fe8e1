"""The functional core's glue between NNX modules and pure `jax.jit` functions.

A module is split once into a static graphdef and a state pytree; jitted functions take the
state as an argument (so 1.2B teacher weights are never baked into a program as constants) and
merge it back with `copy=True`, which avoids NNX's "mutate from a different trace level" error.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def jit_apply(module: nnx.Module, fn: Callable[..., Any], mesh=None) -> Callable[..., Any]:
    """`fn(module, *args)` as a jitted function of `*args`, with the module's state an argument
    (replicated over `mesh` when given, so sharded batches run data-parallel)."""
    graphdef, state = nnx.split(module)
    if mesh is not None:
        from pand_jax.train.mesh import replicate

        state = replicate(mesh, state)

    @jax.jit
    def apply(state, *args):
        return fn(nnx.merge(graphdef, state, copy=True), *args)

    return lambda *args: apply(state, *args)
