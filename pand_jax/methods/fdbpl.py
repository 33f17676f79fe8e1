"""FDBPL (Zhang et al., 2025): distillation from the teacher's class distribution looked up per
random crop (FKD's sparse soft labels, `--soft-labels`), weighted by the teacher's confidence.

For the CNN students this is the positive-prompt path of the released loss: the student
classifies by the anchors (an anchor head, as PromptKD's: z+ = s L2norm(P(h)) T_hat^T) and
matches p_T both ways. A CLIP student runs the released setting: dual prompts, positive and
negative text contexts on its own text tower, with the negative prompts' entropy and cosine
terms and L_casc (docs/paper_vs_code.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from pydantic import Field

from pand_jax import config, losses
from pand_jax.methods.base import Inputs, Method


class FDBPLLoss(config.Schema):
    logit_scale: float = Field(gt=0)
    temperature: float = Field(gt=0)
    forward_weight: float = Field(ge=0)
    reverse_weight: float = Field(ge=0)
    # A CLIP student's dual prompts: the words its positive and negative text contexts start
    # from, the prompt around them, and the negative path's weights.
    positive_init: str = Field(min_length=1, description="a non-empty text")
    negative_init: str = Field(min_length=1, description="a non-empty text")
    prompt_template: str = Field(
        pattern=config.TEMPLATE, description="a text with {} where the class name goes"
    )
    negative_weight: float = Field(ge=0)
    cosine_weight: float = Field(ge=0)
    cascade_weight: float = Field(ge=0)


def teacher_log_probs(x: Inputs, scale, temperature):
    """log p_T [B, C]: of the sparse cache's q when the batch has it, else
    log_softmax(s t_hat T_hat^T / T)."""
    if x.teacher_probs is not None:
        # fp16 storage rounds a probability below ~6e-8 to 0 (and MS's remainder can round to
        # 0): the reverse KL reads log q, which must stay finite.
        q = losses.fp32(x.teacher_probs)
        return jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))
    return jax.nn.log_softmax(
        losses.teacher_logits(x.teacher, x.anchors, scale) / temperature, axis=1
    )


def fdbpl_objective(
    x: Inputs,
    *,
    scale,
    temperature,
    forward_weight,
    reverse_weight,
    negative_weight,
    cosine_weight,
    cascade_weight,
):
    """L = mean(a w KL(p_T || p+)) + mean(b w KL(p+ || p_T)), w = 1 - H(p_T) / log C, with
    p+ = softmax(z+) and p_T the teacher's (`losses.fdbpl`). No labels. z+ is the anchor head's
    (CNN students) or a CLIP student's positive prompts'; with its negative prompts too, plus
    c mean((1 - w)(-H(softmax(z-)))) + d mean(w cos(z+, z-)) + e L_casc (`losses.fdbpl_negative`,
    `losses.fdbpl_cascade`, which is zero)."""
    log_p = teacher_log_probs(x, scale, temperature)
    loss, w = losses.fdbpl(x.logits, log_p, forward_weight, reverse_weight)
    terms = {"fdbpl": loss, "confidence": w}
    if x.negative_logits is not None:
        negative, entropy, cosine = losses.fdbpl_negative(
            x.logits,
            x.negative_logits,
            losses.fdbpl_confidence(log_p),
            negative_weight=negative_weight,
            cosine_weight=cosine_weight,
        )
        cascade = losses.fdbpl_cascade(*x.text_pair, jnp.argmax(log_p, axis=1))
        loss = loss + negative + cascade_weight * cascade
        terms.update(negative_entropy=entropy, cosine=cosine, cascade=cascade)
    return loss, terms


def settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    f = loss["fdbpl"]
    return dict(
        scale=f["logit_scale"],
        temperature=f["temperature"],
        forward_weight=f["forward_weight"],
        reverse_weight=f["reverse_weight"],
        negative_weight=f["negative_weight"],
        cosine_weight=f["cosine_weight"],
        cascade_weight=f["cascade_weight"],
    )


def rule(cfg, num_classes: int):
    """The reverse KL reads log p_T: a sparse distribution with zeros (MR, hard) has none."""
    if cfg["soft_labels"] in ("mr", "hard"):
        return (
            "soft_labels",
            cfg["soft_labels"],
            "embedding or ms with --method fdbpl (its "
            "reverse KL(p+ || p_T) is infinite where p_T is 0, as MR and hard labels are)",
        )
    return None


FDBPL = Method(
    name="fdbpl",
    label="FDBPL",
    objective=fdbpl_objective,
    settings=settings,
    sections=("fdbpl",),
    schema=FDBPLLoss,
    teacher="logits",
    anchors="learned",
    reads_labels=False,
    anchor_head=lambda loss: loss["fdbpl"]["logit_scale"],
    teacher_distribution=lambda loss: (loss["fdbpl"]["logit_scale"], loss["fdbpl"]["temperature"]),
    dual_prompts=lambda loss: (
        loss["fdbpl"]["positive_init"],
        loss["fdbpl"]["negative_init"],
        loss["fdbpl"]["prompt_template"],
    ),
    rule=rule,
    table_sets=(("no_psc", False),),
)
