"""Function matching (Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022; google-research/big_vision's configs/proj/distill): teacher and student
see the same mixed view (the "mixup" augmentation, two training images per view) and the student
matches the teacher's class distribution on it, with no labels."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pand_jax import config
from pand_jax.data import augment
from pand_jax.methods.base import Inputs, Method, Rule
from pand_jax.methods.kd import teacher_kd


class FMLoss(config.Schema):
    temperature: float = Field(gt=0)  # big_vision's distance_kw t


def fm_objective(x: Inputs, *, temperature, scale):
    """L = T^2 KL(softmax(z_t / T) || softmax(z_s / T)) on the mixed view, against the
    teacher's anchor logits z_t = s t_hat T_hat^T (or the sparse cache's q): big_vision's
    `kl` distance, and no cross-entropy."""
    distill = teacher_kd(x, scale, temperature, standardize=False)
    return distill, {"kd": distill}


def _rule(cfg: dict[str, Any], num_classes: int) -> Rule | None:
    if cfg["augment"] != augment.MIXUP:
        return (
            "augment",
            cfg["augment"],
            f"{augment.MIXUP!r} with --method fm: function matching trains on mixed views "
            f"(--set augment={augment.MIXUP})",
        )
    return None


FM = Method(
    name="fm",
    label="Function matching",
    objective=fm_objective,
    settings=lambda loss, epochs, learned, dataset: dict(loss["fm"], scale=loss["scale"]),
    sections=("fm",),
    schema=FMLoss,
    teacher="logits",
    anchors="template",
    reads_labels=False,
    teacher_distribution=lambda loss: (loss["scale"], loss["fm"]["temperature"]),
    rule=_rule,
    table_sets=(("augment", augment.MIXUP),),
)
