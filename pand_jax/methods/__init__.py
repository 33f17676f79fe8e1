"""Stage-NSD methods, one registry entry each (`Method`): the objective (one function per paper
equation), the heads it adds to the student, the teacher signal it reads, where its anchors come
from, whether it reads labels, its config section and its schema. A method is its module here
and a line in `REGISTRY`; docs/methods.md says how to add one.

    method = methods.get("pand")
    settings = method.settings(cfg["loss"], epochs, learned, cfg["dataset"])
    objective = functools.partial(method.objective, **settings)
"""

from __future__ import annotations

from typing import Any

from pand_jax import config
from pand_jax.data import augment
from pand_jax.methods import dait, dist, dkd, fdbpl, fm, kd, no_kd, pand, promptkd, rkd, vl2lite
from pand_jax.methods.base import INTERMEDIATE, Flag, Inputs, Method, Row, Rule, Sweep

# In the paper's Table 1 order, then the other systems, then the general-purpose KD methods:
# reproduce.py's rows follow it.
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        no_kd.NONE,
        kd.KD,
        rkd.RKD,
        vl2lite.VL2LITE,
        pand.PAND,
        promptkd.PROMPTKD,
        fdbpl.FDBPL,
        dait.DAIT,
        dait.DAIT_IT,
        dkd.DKD,
        dist.DIST,
        fm.FM,
    )
}
NAMES = tuple(REGISTRY)
IT_METHOD = dait.DAIT_IT.name  # `train.py --stage it`: DAIT's first stage


def loss_sections() -> dict[str, type[config.Schema]]:
    """`loss.NAME` -> its schema, for `config.Facts`."""
    return {m.name: m.schema for m in REGISTRY.values() if m.schema is not None}


def names(where) -> list[str]:
    """The names of the methods for which `where(method)` holds, in registry order."""
    return [m.name for m in REGISTRY.values() if where(m)]


def flags() -> tuple[Flag, ...]:
    """Every method's own train.py flags."""
    return tuple(f for m in REGISTRY.values() for f in m.flags)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {list(NAMES)}")
    return REGISTRY[name]


def rule(cfg: dict[str, Any], num_classes: int) -> Rule | None:
    """The first rule of the config's method that the config breaks (`config.Facts`)."""
    method = get(cfg["method"])
    if cfg["unlabeled_data"] and method.reads_labels:
        label_free = names(lambda m: not m.reads_labels)
        return (
            "unlabeled_data",
            cfg["unlabeled_data"],
            f"null with --method {method.name}, which trains on labels (images without "
            f"labels need a method that reads none: {', '.join(label_free)})",
        )
    if cfg["augment"] == augment.MIXUP and method.reads_labels:
        return (
            "augment",
            cfg["augment"],
            f"another recipe with --method {method.name}, which trains on labels: a mixed view "
            f"shows two examples under one label (mixup serves the methods that read none: "
            f"{', '.join(names(lambda m: not m.reads_labels))})",
        )
    if cfg["student_text_context"] and (method.anchor_head or method.dual_prompts):
        return (
            "student_text_context",
            cfg["student_text_context"],
            f"0 with --method {method.name}, which makes the student's classifier itself "
            "(a projector onto the anchors, or its own dual prompts)",
        )
    kind = cfg["soft_labels"]
    if kind != "embedding":
        if not cfg["teacher_cache"] or cfg["teacher_cache_online"]:
            return (
                "soft_labels",
                kind,
                "embedding without --teacher-cache V: sparse soft "
                "labels are stored in the teacher cache",
            )
        if method.teacher_distribution is None:
            readers = names(lambda m: m.teacher_distribution)
            reads = "embedding" if method.teacher == "embedding" else "logits in full"
            return (
                "soft_labels",
                kind,
                f"embedding with --method {method.name}, which reads the "
                f"teacher's {reads} (sparse labels serve {', '.join(readers)})",
            )
        k = 1 if kind == "hard" else cfg["soft_labels_k"]
        if k >= num_classes:
            return (
                "soft_labels_k",
                k,
                f"< the {num_classes} classes (the classes outside the "
                "top-K share the rest of the probability)",
            )
    return _standardize_rule(cfg, method) or method.rule(cfg, num_classes)


def _standardize_rule(cfg: dict[str, Any], method: Method) -> Rule | None:
    """Logit standardisation switched on in a `loss` section the method does not read, or
    with sparse soft labels, which keep the softmax of the teacher's logits and not them."""
    switches = [n for n, schema in loss_sections().items() if "standardize" in schema.model_fields]
    for section in switches:
        if not cfg["loss"][section]["standardize"]:
            continue
        if section not in method.sections:
            return (
                f"loss.{section}.standardize",
                True,
                f"false with --method {method.name}, which reads no loss.{section} "
                f"(logit standardisation is a switch of {', '.join(switches)})",
            )
        if cfg["soft_labels"] != "embedding":
            return (
                "soft_labels",
                cfg["soft_labels"],
                f"embedding with loss.{section}.standardize = true: standardisation z-scores "
                "the teacher's logits, and sparse soft labels keep only their softmax",
            )
    return None


__all__ = [
    "INTERMEDIATE",
    "IT_METHOD",
    "Flag",
    "Inputs",
    "Method",
    "NAMES",
    "REGISTRY",
    "Row",
    "Sweep",
    "flags",
    "get",
    "loss_sections",
    "names",
    "rule",
]
