"""KD (Hinton et al., 2015) against the teacher's class logits over the anchors, with logit
standardisation (Sun et al., CVPR 2024) as a switch."""

from __future__ import annotations

from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method

# The released code's eps in (z - mean) / (eps + std).
STANDARDIZE_EPS = 1e-7


class KDLoss(config.Schema):
    temperature: float = Field(gt=0)
    weight: float = Field(ge=0)  # of the KL term; CE's is 1
    standardize: bool  # z-score the student's and the teacher's logits before the softmaxes


def logit_pair(x: Inputs, scale, standardize):
    """(z_s, z_t): the student's logits and the teacher's over the anchors, z_t = s t_hat
    T_hat^T, both z-scored per row when `standardize`."""
    z_s, z_t = x.logits, losses.teacher_logits(x.teacher, x.anchors, scale)
    if standardize:
        return (losses.standardize_logits(z, STANDARDIZE_EPS) for z in (z_s, z_t))
    return z_s, z_t


def teacher_kd(x: Inputs, scale, temperature, *, standardize):
    """T^2 batch-mean KL(p_T || softmax(z_s / T)), p_T = softmax(z_t / T) with the teacher's
    anchor logits z_t = s t_hat T_hat^T, or the sparse cache's q when the batch has it (never
    with `standardize`: the cache stores no logits, and `methods.rule` refuses the pair)."""
    if x.teacher_probs is not None:
        return losses.kd_soft(x.logits, x.teacher_probs, temperature)
    return losses.kd(*logit_pair(x, scale, standardize), temperature)


def kd_objective(x: Inputs, *, temperature, weight, standardize, scale):
    """Hinton KD against the teacher's anchor logits z_t = s t_hat T_hat^T:
    L = CE + w T^2 KL(softmax(z_t / T) || softmax(z_s / T)), the logits z-scored first under
    logit standardisation (CE reads the raw ones, as released)."""
    cls = losses.cross_entropy(x.logits, x.labels)
    distill = weight * teacher_kd(x, scale, temperature, standardize=standardize)
    return cls + distill, {"cls": cls, "kd": distill}


KD = Method(
    name="kd",
    label="KD",
    objective=kd_objective,
    settings=lambda loss, epochs, learned, dataset: dict(loss["kd"], scale=loss["scale"]),
    sections=("kd",),
    schema=KDLoss,
    teacher="logits",
    anchors="template",
    reads_labels=True,
    teacher_distribution=lambda loss: (loss["scale"], loss["kd"]["temperature"]),
)
