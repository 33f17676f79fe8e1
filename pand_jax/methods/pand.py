"""PAND: the VL2Lite base loss with Stage-PSC's learned anchors, plus lambda_NSD * L_NSD."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods import vl2lite
from pand_jax.methods.base import Flag, Inputs, Method, Row, Sweep

LAMBDA_KEY = "loss.pand.lambda_nsd"


class PANDLoss(config.Schema):
    lambda_nsd: float = Field(ge=0)
    nsd_form: Literal[losses.NSD_FORMS]
    nsd_k: int = Field(ge=1)
    # `rule` checks that it divides batch_size.
    nsd_group_size: int | None = Field(ge=2, description="for the whole batch")


def pand_objective(
    x: Inputs, *, num_epochs, tau, scale, cls_offset, reduction, lambda_nsd, nsd_form, k, group_size
):
    """PAND's Stage-NSD objective with the anchors T learned by Stage-PSC:

        L_total = L_base + lambda_NSD * L_NSD

    L_base is `vl2lite.vl2lite_objective` (with the batch-mean text KL);
    L_NSD is `losses.nsd` on z_s and the teacher logits z_t = s t_hat T_hat^T
    (`losses.teacher_logits`): the paper's Eq. 6-8 (K nearest non-target classes, margin
    distributions, Jensen-Shannon), or the released code's in-batch form. lambda_NSD = 0 gives
    the "+PSC only" ablation.
    """
    total, terms = vl2lite.vl2lite_objective(
        x, num_epochs=num_epochs, tau=tau, scale=scale, cls_offset=cls_offset, reduction=reduction
    )
    if lambda_nsd:
        terms["nsd"] = losses.nsd(
            x.logits,
            losses.teacher_logits(x.teacher, x.anchors, scale),
            x.labels,
            form=nsd_form,
            k=k,
            group_size=group_size,
        )
        total = total + lambda_nsd * terms["nsd"]
    return total, terms


def settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    p = loss["pand"]
    return dict(
        vl2lite.settings(loss, num_epochs, learned, dataset),
        lambda_nsd=p["lambda_nsd"],
        nsd_form=p["nsd_form"],
        k=p["nsd_k"],
        group_size=p["nsd_group_size"],
    )


def rule(cfg, num_classes: int):
    """K below the neighbourhood it is drawn from, and groups that tile the batch."""
    p, batch = cfg["loss"]["pand"], cfg["batch_size"]
    group = p["nsd_group_size"] or batch
    if p["nsd_group_size"] and batch % group:
        return (
            "loss.pand.nsd_group_size",
            group,
            f"a divisor of batch_size ({batch}): the batch is split into groups",
        )
    if not p["lambda_nsd"]:
        return None
    if p["nsd_form"] == "paper" and p["nsd_k"] >= num_classes:
        return (
            "loss.pand.nsd_k",
            p["nsd_k"],
            f"< the {num_classes} classes of {cfg['dataset']} "
            "(the neighbourhood is the k nearest classes other than the true one); "
            f"{_fix_k(num_classes)}",
        )
    if p["nsd_form"] == "batch" and p["nsd_k"] >= group:
        return (
            "loss.pand.nsd_k",
            p["nsd_k"],
            f"< the {group} samples of a neighbourhood group "
            f"(loss.pand.nsd_group_size, else batch_size); {_fix_k(group)}",
        )
    return None


def _fix_k(bound: int) -> str:
    # K stays what was asked for (it is a paper hyper-parameter, recorded in config.json and
    # the summary), so a small dataset is refused with the flag that fits it, not adapted.
    lower = f"--set loss.pand.nsd_k={bound - 1}, or " if bound > 1 else ""
    return f"pass {lower}--lambda-nsd 0 to train without NSD"


PAND = Method(
    name="pand",
    label="PAND",
    objective=pand_objective,
    settings=settings,
    sections=("vl2lite", "pand"),
    schema=PANDLoss,
    teacher="embedding",
    anchors="learned",
    reads_labels=True,
    heads=vl2lite.align_heads,
    rule=rule,
    flags=(
        Flag("--nsd-form", "loss.pand.nsd_form", choices=losses.NSD_FORMS),
        Flag("--lambda-nsd", LAMBDA_KEY, type=float),
    ),
    table_sets=(("no_psc", False), (LAMBDA_KEY, None)),
    # The paper's Table 2 (CUB, ResNet-18) and its sensitivity study of lambda_NSD (Fig. 4).
    ablations=(
        Row("+PSC", "pand", (("no_psc", False), (LAMBDA_KEY, 0.0))),
        Row("+NSD", "pand", (("no_psc", True),)),
    ),
    ablation_table=("VL2Lite", "+PSC", "+NSD", "PAND"),
    sweep=Sweep(
        key=LAMBDA_KEY,
        symbol="lambda_NSD",
        tex=r"\lambda_{NSD}",
        label="lambda",
        values=(0.0, 0.25, 0.5, 0.75, 1.0),
        sets=(("no_psc", False),),
    ),
)
