"""DAIT (He, Li, Wu, arXiv 2603.15166): an adaptive intermediate teacher (IT) between the frozen
CLIP and the student. No code is released: what the paper's text fixes is its two stages, the
rest is our reading, marked in docs/paper_vs_code.md.

    stage 1 (`train.py --stage it`, method "dait_it"): the IT, itself a small student, learns
        from the CLIP with labels, representation alignment and semantic alignment;
    stage 2 (`--method dait --intermediate-teacher DIR`): the frozen IT teaches the student
        through its spatial feature map (and optionally its logits).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import INTERMEDIATE, Inputs, Method


class DAITLoss(config.Schema):
    """Both stages' weights (stage 1: alpha, beta; stage 2: gamma, delta) and their shared
    temperature and logit scale."""

    alpha: float = Field(ge=0)
    beta: float = Field(ge=0)
    gamma: float = Field(ge=0)
    delta: float = Field(ge=0)
    temperature: float = Field(gt=0)
    logit_scale: float = Field(gt=0)


def it_heads(student_dim: int, teacher_dim: int, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """P, the IT's alignment head: Linear(d -> D) from its pooled feature to the CLIP's width."""
    return {"align": nnx.Linear(student_dim, teacher_dim, rngs=rngs)}


def it_objective(x: Inputs, *, alpha, beta, temperature, scale):
    """L_IT = CE(y, z_IT) + alpha L1(L2norm(P(h)), t_hat)
              + beta T^2 KL(softmax(s t_hat T_hat^T / T) || softmax(s L2norm(P(h)) T_hat^T / T))

    with h the IT's pooled feature, t the CLIP's image embedding, T the anchors and s the
    teacher's logit scale (`loss.dait.logit_scale`)."""
    cls = losses.cross_entropy(x.logits, x.labels)
    projected = x.heads["align"](x.features)
    p_hat, t_hat = (
        losses.l2_normalize(losses.fp32(projected)),
        losses.l2_normalize(losses.fp32(x.teacher)),
    )
    representation = jnp.mean(jnp.abs(p_hat - t_hat))
    semantic = losses.kd(
        losses.teacher_logits(projected, x.anchors, scale),
        losses.teacher_logits(x.teacher, x.anchors, scale),
        temperature,
    )
    total = cls + alpha * representation + beta * semantic
    return total, {"cls": cls, "representation": representation, "semantic": semantic}


def adapter_heads(student_dim: int, teacher_dim: int, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """A, the 1x1 convolution from the student's last map (d channels) to the IT's (d'): a
    Linear over the channel axis of an NHWC map is exactly that convolution."""
    return {"adapter": nnx.Linear(student_dim, teacher_dim, rngs=rngs)}


def dait_objective(x: Inputs, *, gamma, delta, temperature):
    """L = CE + gamma MSE(L2norm(A(S_map)), L2norm(resize(IT_map))) + delta T^2 KL(IT || S),
    the IT's map resized bilinearly to the student's (`losses.resize_map`), both maps
    normalised per position (`losses.feature_map_mse`)."""
    it_map, it_logits = x.intermediate
    cls = losses.cross_entropy(x.logits, x.labels)
    adapted = x.heads["adapter"](x.feature_map)
    feature = losses.feature_map_mse(adapted, losses.resize_map(it_map, *adapted.shape[1:3]))
    total, terms = cls + gamma * feature, {"cls": cls, "feature": feature}
    if delta:
        terms["kd"] = losses.kd(x.logits, it_logits, temperature)
        total = total + delta * terms["kd"]
    return total, terms


def it_settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    d = loss["dait"]
    return dict(
        alpha=d["alpha"], beta=d["beta"], temperature=d["temperature"], scale=d["logit_scale"]
    )


def dait_settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    d = loss["dait"]
    return dict(gamma=d["gamma"], delta=d["delta"], temperature=d["temperature"])


def dait_rule(cfg, num_classes: int):
    if not cfg["intermediate_teacher"]:
        return (
            "intermediate_teacher",
            None,
            "the intermediate teacher's folder (made by "
            f"python train.py --stage it --dataset {cfg['dataset']}): pass "
            "--intermediate-teacher DIR",
        )
    return None


DAIT_IT = Method(
    name="dait_it",
    label="DAIT intermediate teacher",
    objective=it_objective,
    settings=it_settings,
    sections=("dait",),
    teacher="embedding",
    anchors="learned",
    reads_labels=True,
    heads=it_heads,
    in_table=False,
)

DAIT = Method(
    name="dait",
    label="DAIT",
    objective=dait_objective,
    settings=dait_settings,
    sections=("dait",),
    schema=DAITLoss,
    teacher=INTERMEDIATE,
    anchors=None,
    reads_labels=True,
    heads=adapter_heads,
    rule=dait_rule,
)
