"""DKD, Decoupled Knowledge Distillation (Zhao et al., CVPR 2022; mdistiller's DKD), against
the teacher's class logits over the anchors, with logit standardisation as a switch."""

from __future__ import annotations

import jax.numpy as jnp
from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method
from pand_jax.methods.kd import logit_pair


class DKDLoss(config.Schema):
    alpha: float = Field(ge=0)  # TCKD's weight
    beta: float = Field(ge=0)  # NCKD's weight
    temperature: float = Field(gt=0)
    warmup: int = Field(ge=1)  # epochs over which the DKD term ramps up linearly
    standardize: bool  # z-score the student's and the teacher's logits first


def dkd_objective(x: Inputs, *, alpha, beta, temperature, warmup, standardize, scale):
    """L = CE + min(e / warmup, 1) (alpha TCKD + beta NCKD), with e the 1-based epoch as
    mdistiller counts it, on the teacher's anchor logits z_t = s t_hat T_hat^T."""
    cls = losses.cross_entropy(x.logits, x.labels)
    z_s, z_t = logit_pair(x, scale, standardize)
    ramp = jnp.minimum((x.epoch + 1) / warmup, 1.0)
    distill = ramp * losses.dkd(z_s, z_t, x.labels, alpha=alpha, beta=beta, temperature=temperature)
    return cls + distill, {"cls": cls, "dkd": distill}


def _rule(cfg, num_classes):
    warmup = cfg["loss"]["dkd"]["warmup"]
    if warmup > cfg["epochs"]:
        return (
            "loss.dkd.warmup",
            warmup,
            f"<= epochs ({cfg['epochs']}): the DKD term would not reach its full weight",
        )
    return None


DKD = Method(
    name="dkd",
    label="DKD",
    objective=dkd_objective,
    settings=lambda loss, epochs, learned, dataset: dict(loss["dkd"], scale=loss["scale"]),
    sections=("dkd",),
    schema=DKDLoss,
    teacher="logits",
    anchors="template",
    reads_labels=True,
    # No sparse soft labels: NCKD renormalises the classes other than the true one, which is
    # the tail a top-K cache replaces by an even share.
    rule=_rule,
)
