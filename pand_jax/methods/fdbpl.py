"""FDBPL (Zhang et al., 2025): distillation from the teacher's class distribution looked up per
random crop (FKD's sparse soft labels, `--soft-labels`), weighted by the teacher's confidence.

For the CNN students this is the positive-prompt path of the released loss: the student
classifies by the anchors (an anchor head, as PromptKD's: z+ = s L2norm(P(h)) T_hat^T) and
matches p_T both ways. The negative prompts, their entropy and cosine terms and L_casc need a
second, negative text context, which only the CLIP student has (docs/paper_vs_code.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pand_jax import losses
from pand_jax.methods.base import Inputs, Method


def teacher_log_probs(x: Inputs, scale, temperature):
    """log p_T [B, C]: of the sparse cache's q when the batch has it, else
    log_softmax(s t_hat T_hat^T / T)."""
    if x.teacher_probs is not None:
        # fp16 storage rounds a probability below ~6e-8 to 0 (and MS's remainder can round to
        # 0): the reverse KL reads log q, which must stay finite.
        q = losses.fp32(x.teacher_probs)
        return jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))
    return jax.nn.log_softmax(losses.teacher_logits(x.teacher, x.anchors, scale) / temperature,
                              axis=1)


def fdbpl_objective(x: Inputs, *, scale, temperature, forward_weight, reverse_weight):
    """L = mean(a w KL(p_T || p+)) + mean(b w KL(p+ || p_T)), w = 1 - H(p_T) / log C, with
    p+ = softmax(z+) of the anchor head and p_T the teacher's (`losses.fdbpl`). No labels."""
    loss, w = losses.fdbpl(x.logits, teacher_log_probs(x, scale, temperature), forward_weight,
                           reverse_weight)
    return loss, {"fdbpl": loss, "confidence": w}


def settings(loss, num_epochs: int, learned: bool, dataset: str) -> dict:
    f = loss["fdbpl"]
    return dict(scale=f["logit_scale"], temperature=f["temperature"],
                forward_weight=f["forward_weight"], reverse_weight=f["reverse_weight"])


def rule(cfg, num_classes: int):
    """The reverse KL reads log p_T: a sparse distribution with zeros (MR, hard) has none."""
    if cfg["soft_labels"] in ("mr", "hard"):
        return ("soft_labels", cfg["soft_labels"], "embedding or ms with --method fdbpl (its "
                "reverse KL(p+ || p_T) is infinite where p_T is 0, as MR and hard labels are)")
    return None


FDBPL = Method(
    name="fdbpl", label="FDBPL", objective=fdbpl_objective, settings=settings,
    sections=("fdbpl",), teacher="logits", anchors="learned", reads_labels=False,
    anchor_head=lambda loss: loss["fdbpl"]["logit_scale"],
    teacher_distribution=lambda loss: (loss["fdbpl"]["logit_scale"],
                                       loss["fdbpl"]["temperature"]),
    rule=rule, table_sets=(("no_psc", False),))
