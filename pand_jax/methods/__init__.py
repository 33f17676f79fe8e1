"""Stage-NSD methods, one registry entry each (`Method`): the objective (one function per paper
equation), the heads it adds to the student, the teacher signal it reads, where its anchors come
from, whether it reads labels, and its config sections. docs/methods.md says how to add one.

    method = methods.get("pand")
    objective = functools.partial(method.objective, **method.settings(cfg["loss"], epochs, learned))
"""
from __future__ import annotations

from typing import Any

from pand_jax.methods import baselines, pand, vl2lite
from pand_jax.methods.base import Inputs, Method, Rule

# In the paper's Table 1 order: reproduce.py's rows follow it.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    baselines.NONE, baselines.KD, baselines.RKD, vl2lite.VL2LITE, pand.PAND)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {list(NAMES)}")
    return REGISTRY[name]


def rule(cfg: dict[str, Any], num_classes: int) -> Rule | None:
    """The first rule of the config's method that the config breaks (`config.Facts`)."""
    return get(cfg["method"]).rule(cfg, num_classes)


__all__ = ["Inputs", "Method", "NAMES", "REGISTRY", "get", "rule"]
