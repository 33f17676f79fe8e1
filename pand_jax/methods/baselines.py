"""The baselines of the paper's Table 1: no KD, KD (Hinton) and RKD (Park et al. 2019)."""

from __future__ import annotations

from pand_jax import losses
from pand_jax.methods.base import Inputs, Method


def none_objective(x: Inputs):
    """No KD: L = CE(z_s, y)."""
    cls = losses.cross_entropy(x.logits, x.labels)
    return cls, {"cls": cls}


def teacher_kd(x: Inputs, scale, temperature):
    """T^2 batch-mean KL(p_T || softmax(z_s / T)), p_T = softmax(z_t / T) with the teacher's
    anchor logits z_t = s t_hat T_hat^T, or the sparse cache's q when the batch has it."""
    if x.teacher_probs is not None:
        return losses.kd_soft(x.logits, x.teacher_probs, temperature)
    return losses.kd(x.logits, losses.teacher_logits(x.teacher, x.anchors, scale), temperature)


def kd_objective(x: Inputs, *, temperature, scale):
    """Hinton KD against the teacher's anchor logits z_t = s t_hat T_hat^T:
    L = CE + T^2 KL(softmax(z_t / T) || softmax(z_s / T))."""
    cls = losses.cross_entropy(x.logits, x.labels)
    distill = teacher_kd(x, scale, temperature)
    return cls + distill, {"cls": cls, "kd": distill}


def rkd_objective(x: Inputs, *, distance_weight, angle_weight):
    """RKD on the penultimate features: L = CE + w_d L_distance(h, t) + w_a L_angle(h, t)."""
    cls = losses.cross_entropy(x.logits, x.labels)
    relational = losses.rkd(x.features, x.teacher, distance_weight, angle_weight)
    return cls + relational, {"cls": cls, "rkd": relational}


NONE = Method(
    name="none",
    label="no KD",
    objective=none_objective,
    settings=lambda loss, epochs, learned, dataset: {},
    sections=(),
    teacher=None,
    anchors=None,
    reads_labels=True,
)

KD = Method(
    name="kd",
    label="KD",
    objective=kd_objective,
    settings=lambda loss, epochs, learned, dataset: dict(
        temperature=loss["kd"]["temperature"], scale=loss["scale"]
    ),
    sections=("kd",),
    teacher="logits",
    anchors="template",
    reads_labels=True,
    teacher_distribution=lambda loss: (loss["scale"], loss["kd"]["temperature"]),
)

RKD = Method(
    name="rkd",
    label="RKD",
    objective=rkd_objective,
    settings=lambda loss, epochs, learned, dataset: dict(loss["rkd"]),
    sections=("rkd",),
    teacher="embedding",
    anchors=None,
    reads_labels=True,
)
