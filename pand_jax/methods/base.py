"""What a Stage-NSD method is: one `Method` entry (see `pand_jax.methods`), and the `Inputs`
its objective sees for one batch."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
from flax import nnx

# What a method reads of the frozen teacher: its image embedding t, or only its class logits
# z_t = s t T^T over the anchors (which a future cache of class probabilities can also serve).
TEACHER_SIGNALS = ("embedding", "logits")
# Where a method's text anchors T come from: hand-written prompt templates unless --anchors
# names a file, or Stage-PSC's learned prompts (template ones only with --no-psc).
ANCHOR_KINDS = ("template", "learned")

# (config key, its value, what is allowed) of a broken rule, as `config.validate` reports it.
Rule = tuple[str, Any, str]


class Inputs(NamedTuple):
    """What a Stage-NSD objective sees for one batch."""
    logits: jax.Array                  # z_s [B, C]
    features: jax.Array                # student penultimate features h before L2norm [B, d]
    labels: jax.Array | None           # y [B]; None for a method that reads no labels
    teacher: jax.Array | None          # t, the teacher's image embedding [B, D]
    anchors: jax.Array | None          # T, text anchors [C, D]
    heads: dict[str, Callable]         # the method's trainable heads, by name
    epoch: jax.Array | int             # 0-based epoch e (loss-weight schedules read it)


def no_heads(student_dim: int, teacher_dim: int, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    return {}


def no_rule(cfg: dict[str, Any], num_classes: int) -> Rule | None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """One Stage-NSD method. Nothing outside `pand_jax.methods` branches on a method's name:
    the trainer, the CLI, reproduce.py and deploy read these fields."""
    name: str                 # --method NAME
    label: str                # its row in reproduce's tables
    objective: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (Inputs, **settings)
    # (configs/nsd.json's `loss` dict, epochs of the run, learned anchors?) -> objective kwargs
    settings: Callable[[dict[str, Any], int, bool], dict[str, Any]]
    sections: tuple[str, ...]  # the `loss` sections it reads (`loss.scale` is shared)
    teacher: str | None        # one of TEACHER_SIGNALS, or None: no teacher at all
    anchors: str | None        # one of ANCHOR_KINDS, or None: no text anchors
    reads_labels: bool
    heads: Callable[[int, int, nnx.Rngs], dict[str, nnx.Module]] = no_heads
    # Rules between config keys that only this method has (run by `config.validate`).
    rule: Callable[[dict[str, Any], int], Rule | None] = no_rule
    # The config values its row of reproduce's Table 1 pins, as (dotted key, value); None is
    # configs/nsd.json's value, named so that other rows at that value are the same run.
    table_sets: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.teacher not in (None, *TEACHER_SIGNALS):
            raise ValueError(f"{self.name}: teacher must be None or one of {TEACHER_SIGNALS}")
        if self.anchors not in (None, *ANCHOR_KINDS):
            raise ValueError(f"{self.name}: anchors must be None or one of {ANCHOR_KINDS}")

    def wants_learned_anchors(self, no_psc: bool) -> bool:
        """Whether a run reads Stage-PSC's anchors.npz (--no-psc asks for templates)."""
        return self.anchors == "learned" and not no_psc
