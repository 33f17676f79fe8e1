"""No KD: the student trained on labels alone (the paper's Table 1 baseline)."""

from __future__ import annotations

from pand_jax import losses
from pand_jax.methods.base import Inputs, Method


def none_objective(x: Inputs):
    """No KD: L = CE(z_s, y)."""
    cls = losses.cross_entropy(x.logits, x.labels)
    return cls, {"cls": cls}


NONE = Method(
    name="none",
    label="no KD",
    objective=none_objective,
    settings=lambda loss, epochs, learned, dataset: {},
    sections=(),
    teacher=None,
    anchors=None,
    reads_labels=True,
)
