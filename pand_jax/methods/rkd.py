"""RKD (Park et al., CVPR 2019): distance and angle relations of the penultimate features."""

from __future__ import annotations

from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method


class RKDLoss(config.Schema):
    distance_weight: float = Field(ge=0)
    angle_weight: float = Field(ge=0)


def rkd_objective(x: Inputs, *, distance_weight, angle_weight):
    """RKD on the penultimate features: L = CE + w_d L_distance(h, t) + w_a L_angle(h, t)."""
    cls = losses.cross_entropy(x.logits, x.labels)
    relational = losses.rkd(x.features, x.teacher, distance_weight, angle_weight)
    return cls + relational, {"cls": cls, "rkd": relational}


RKD = Method(
    name="rkd",
    label="RKD",
    objective=rkd_objective,
    settings=lambda loss, epochs, learned, dataset: dict(loss["rkd"]),
    sections=("rkd",),
    schema=RKDLoss,
    teacher="embedding",
    anchors=None,
    reads_labels=True,
)
