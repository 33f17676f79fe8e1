"""KD (Hinton et al., 2015) against the teacher's class logits over the anchors."""

from __future__ import annotations

from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method


class KDLoss(config.Schema):
    temperature: float = Field(gt=0)


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


KD = Method(
    name="kd",
    label="KD",
    objective=kd_objective,
    settings=lambda loss, epochs, learned, dataset: dict(
        temperature=loss["kd"]["temperature"], scale=loss["scale"]
    ),
    sections=("kd",),
    schema=KDLoss,
    teacher="logits",
    anchors="template",
    reads_labels=True,
    teacher_distribution=lambda loss: (loss["scale"], loss["kd"]["temperature"]),
)
