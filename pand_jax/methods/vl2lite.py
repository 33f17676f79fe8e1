"""VL2Lite: the base loss L_base of PAND, with two trainable align heads."""

from __future__ import annotations

from typing import Literal

import jax
from flax import nnx
from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method

# `loss.vl2lite.txt_reduction`: "auto" is PAND's batch-mean text KL with learned anchors and
# VL2Lite's half of it with template ones (the released code's two paths); resolved in
# `settings`, the one place that reads it.
AUTO = "auto"


class VL2LiteLoss(config.Schema):
    tau: float = Field(gt=0)
    cls_offset: float = Field(ge=0, le=1)
    txt_reduction: Literal[(AUTO, *losses.TXT_REDUCTIONS)]


class AlignMLP(nnx.Module):
    """VL2Lite's align head: Linear(D -> d) - ReLU - Linear(d -> d)."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_dim, out_dim, rngs=rngs)
        self.fc2 = nnx.Linear(out_dim, out_dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def align_heads(student_dim: int, teacher_dim: int, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """MLP_img and MLP_txt, from the teacher's width D to the student's feature width d (L_vis
    compares the student's features with MLP_img's output directly)."""
    return {
        "align_image": AlignMLP(teacher_dim, student_dim, rngs=rngs),
        "align_text": AlignMLP(teacher_dim, student_dim, rngs=rngs),
    }


def vl2lite_objective(x: Inputs, *, num_epochs, tau, scale, cls_offset, reduction):
    """The VL2Lite base loss, PAND's L_base:

        L_base = w_cls L_cls + w_vis L_vis + w_txt L_txt                  (`losses.loss_weights`)
        L_cls  = CE(z_s, y)                                               (`losses.cross_entropy`)
        L_vis  = mean |L2norm(h) - L2norm(MLP_img(t_hat))|                (`losses.vl2lite`)
        L_txt  = tau^2 KL(softmax(s t_hat T_hat^T / tau) || softmax(s h_hat A^T / tau)),
                 A = L2norm(MLP_txt(T))                                   (`losses.vl2lite`)

    with t_hat, T_hat, h_hat the L2-normalised t, T, h. w_cls = clip(offset + e / 8E, 0, 1),
    w_vis = w_txt = (1 - w_cls) / 2 (the released schedule; the paper states it starts at
    0.01 / 0.495 / 0.495, i.e. cls_offset 0.01).
    """
    t_hat = losses.l2_normalize(losses.fp32(x.teacher))
    cls, vis, txt = losses.vl2lite(
        x.features,
        t_hat,
        x.anchors,
        align_image=x.heads["align_image"](t_hat),
        align_text=x.heads["align_text"](x.anchors),
        labels=x.labels,
        student_logits=x.logits,
        temperature=tau,
        reduction=reduction,
        scale=scale,
    )
    w_cls, w_vis, w_txt = losses.loss_weights(x.epoch, num_epochs, cls_offset)
    total = w_cls * cls + w_vis * vis + w_txt * txt
    return total, {"cls": cls, "vis": vis, "txt": txt, "w_cls": w_cls}


def settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    v = loss["vl2lite"]
    reduction = v["txt_reduction"]
    if reduction == AUTO:
        reduction = "batch_mean" if learned else "half_batch_mean"
    return dict(
        num_epochs=num_epochs,
        tau=v["tau"],
        scale=loss["scale"],
        cls_offset=v["cls_offset"],
        reduction=reduction,
    )


VL2LITE = Method(
    name="vl2lite",
    label="VL2Lite",
    objective=vl2lite_objective,
    settings=settings,
    sections=("vl2lite",),
    schema=VL2LiteLoss,
    teacher="embedding",
    anchors="template",
    reads_labels=True,
    heads=align_heads,
)
