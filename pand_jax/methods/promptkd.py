"""PromptKD (Li et al., CVPR 2024): label-free distillation against the teacher's pre-stored
class vectors. The student classifies by the anchors through a trained projector (its head is
`models.heads.AnchorClassifier`), and its only loss is the teacher's class distribution."""

from __future__ import annotations

import pydantic
from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method
from pand_jax.methods.kd import teacher_kd


class WeightByDataset(config.Schema):
    model_config = pydantic.ConfigDict(extra="allow")  # any dataset key, and "default"
    default: float = Field(gt=0)

    @pydantic.model_validator(mode="after")
    def _positive(self):
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"weight_by_dataset.{key} = {value!r}: expected a number > 0")
        return self


class PromptKDLoss(config.Schema):
    weight: float | None = Field(gt=0, description="for weight_by_dataset's")
    weight_by_dataset: WeightByDataset
    temperature: float = Field(gt=0)
    logit_scale: float = Field(gt=0)


def promptkd_objective(x: Inputs, *, weight, temperature, scale):
    """L = w T^2 sum_{b,c} p_T log(p_T / p_S) / (B C), p = softmax(z / T), with
    z_S = s L2norm(P(h)) t^T (the student's anchor head: `x.logits`) and
    z_T = s L2norm(f_T) t^T (`losses.teacher_logits`), t the stored class vectors, or p_T the
    sparse cache's q. No labels."""
    if x.teacher_probs is None:
        distill = losses.promptkd(
            x.logits, losses.teacher_logits(x.teacher, x.anchors, scale), temperature
        )
    else:  # the batch-mean KL over C: the same sum over B * C entries
        distill = teacher_kd(x, scale, temperature, standardize=False) / x.logits.shape[1]
    return weight * distill, {"kd": distill}


def settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    """w is `loss.promptkd.weight`, or when null the released per-dataset value
    (`loss.promptkd.weight_by_dataset`: dataset key -> w, and "default" for the others)."""
    p = loss["promptkd"]
    weight = p["weight"]
    if weight is None:
        table = p["weight_by_dataset"]
        weight = table.get(dataset, table["default"])
    return dict(weight=weight, temperature=p["temperature"], scale=p["logit_scale"])


PROMPTKD = Method(
    name="promptkd",
    label="PromptKD",
    objective=promptkd_objective,
    settings=settings,
    sections=("promptkd",),
    schema=PromptKDLoss,
    teacher="logits",
    anchors="learned",
    reads_labels=False,
    anchor_head=lambda loss: loss["promptkd"]["logit_scale"],
    teacher_distribution=lambda loss: (
        loss["promptkd"]["logit_scale"],
        loss["promptkd"]["temperature"],
    ),
    table_sets=(("no_psc", False),),
)
