"""DIST, KD from a stronger teacher (Huang et al., NeurIPS 2022; torchdistill's DISTLoss),
against the teacher's class logits over the anchors."""

from __future__ import annotations

from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method


class DISTLoss(config.Schema):
    beta: float = Field(ge=0)  # inter-class relation's weight
    gamma: float = Field(ge=0)  # intra-class relation's weight
    temperature: float = Field(gt=0)


def dist_objective(x: Inputs, *, beta, gamma, temperature, scale):
    """L = CE + beta tau^2 (1 - rows' Pearson) + gamma tau^2 (1 - columns' Pearson) of
    softmax(z / tau), against the teacher's anchor logits z_t = s t_hat T_hat^T or the sparse
    cache's q when the batch has it."""
    cls = losses.cross_entropy(x.logits, x.labels)
    weights = dict(beta=beta, gamma=gamma, temperature=temperature)
    if x.teacher_probs is not None:
        distill = losses.dist_soft(x.logits, x.teacher_probs, **weights)
    else:
        distill = losses.dist(
            x.logits, losses.teacher_logits(x.teacher, x.anchors, scale), **weights
        )
    return cls + distill, {"cls": cls, "dist": distill}


DIST = Method(
    name="dist",
    label="DIST",
    objective=dist_objective,
    settings=lambda loss, epochs, learned, dataset: dict(loss["dist"], scale=loss["scale"]),
    sections=("dist",),
    schema=DISTLoss,
    teacher="logits",
    anchors="template",
    reads_labels=True,
    teacher_distribution=lambda loss: (loss["scale"], loss["dist"]["temperature"]),
)
