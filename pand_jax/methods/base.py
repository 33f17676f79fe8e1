"""What a Stage-NSD method is: one `Method` entry (see `pand_jax.methods`), the `Inputs` its
objective sees for one batch, and the rows of a paper's tables beyond Table 1 (`Row`, `Sweep`)
and the command-line flags (`Flag`) a method may bring."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from pand_jax import config

# What a method reads of the frozen CLIP teacher: its image embedding t, or only its class
# logits z_t = s t T^T over the anchors (which a sparse teacher cache can also serve); or, in
# place of the CLIP, a trained intermediate teacher's map and logits (DAIT's second stage).
TEACHER_SIGNALS = ("embedding", "logits")
INTERMEDIATE = "intermediate"
# Where a method's text anchors T come from: hand-written prompt templates unless --anchors
# names a file, or Stage-PSC's learned prompts (template ones only with --no-psc).
ANCHOR_KINDS = ("template", "learned")

Rule = config.Rule  # (config key, its value, what is allowed) of a broken rule


class Inputs(NamedTuple):
    """What a Stage-NSD objective sees for one batch."""

    logits: jax.Array  # z_s [B, C]
    features: jax.Array  # student penultimate features h before L2norm [B, d]
    labels: jax.Array | None  # y [B]; None for a method that reads no labels
    teacher: jax.Array | None  # t, the teacher's image embedding [B, D]
    anchors: jax.Array | None  # T, text anchors [C, D]
    heads: dict[str, Callable]  # the method's trainable heads, by name
    epoch: jax.Array | int  # 0-based epoch e (loss-weight schedules read it)
    # q [B, C]: the teacher's class distribution looked up in a sparse teacher cache (then
    # `teacher` is None); None: the method computes it from `teacher` and `anchors`.
    teacher_probs: jax.Array | None = None
    feature_map: jax.Array | None = None  # the student's last map [B, h, w, d], unpooled
    # (map [B, h', w', d'], logits [B, C]) of the frozen intermediate teacher (DAIT)
    intermediate: tuple[jax.Array, jax.Array] | None = None
    # A CLIP student's negative prompts (FDBPL): their logits z- [B, C], and the normalised
    # class text features of its positive and negative contexts ([C, D] each).
    negative_logits: jax.Array | None = None
    text_pair: tuple[jax.Array, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of reproduce's tables: a method and the config values that make it, as (dotted
    key, value); a value of None is configs/nsd.json's, named so that other rows at that value
    are the same run."""

    label: str
    method: str
    sets: tuple[tuple[str, Any], ...] = ()

    def values(self) -> dict[str, Any]:
        defaults = config.default_config("nsd")
        return {k: _get(defaults, k) if v is None else v for k, v in self.sets}


def _get(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A paper's sensitivity study of one loss value of its method (reproduce.py's sweep)."""

    key: str  # the dotted config key swept
    symbol: str  # its name in tables, e.g. "lambda_NSD"
    tex: str  # and in figures, e.g. r"\lambda_{NSD}"
    label: str  # its rows' label before the value, e.g. "lambda" -> "lambda 0.5"
    values: tuple[float, ...]  # the paper's
    sets: tuple[tuple[str, Any], ...] = ()  # what every point of the sweep also sets

    def rows(self, method: str, values=None) -> tuple[Row, ...]:
        return tuple(
            Row(f"{self.label} {v:g}", method, self.sets + ((self.key, float(v)),))
            for v in (self.values if values is None else values)
        )


@dataclasses.dataclass(frozen=True)
class Flag:
    """A train.py flag of a method's own, setting one config key (None: flag not given)."""

    name: str  # "--lambda-nsd"
    key: str  # "loss.pand.lambda_nsd"
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None


def no_heads(student_dim: int, teacher_dim: int, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    return {}


def no_rule(cfg: dict[str, Any], num_classes: int) -> Rule | None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """One Stage-NSD method. Nothing outside `pand_jax.methods` names a method: the trainer,
    the config schema, the CLI, reproduce.py and deploy read these fields."""

    name: str  # --method NAME
    label: str  # its row in reproduce's tables
    objective: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (Inputs, **settings)
    # (configs/nsd.json's `loss` dict, epochs of the run, learned anchors?, dataset key) ->
    # objective kwargs
    settings: Callable[[dict[str, Any], int, bool, str], dict[str, Any]]
    sections: tuple[str, ...]  # the `loss` sections it reads (`loss.scale` is shared)
    teacher: str | None  # one of TEACHER_SIGNALS, INTERMEDIATE, or None: no teacher
    anchors: str | None  # one of ANCHOR_KINDS, or None: no text anchors
    reads_labels: bool
    # The schema of the `loss` section named after it (config.py assembles the `loss` schema
    # from these); None: it owns no section (it reads another method's).
    schema: type[config.Schema] | None = None
    heads: Callable[[int, int, nnx.Rngs], dict[str, nnx.Module]] = no_heads
    # None: the student classifies with its own linear head. Otherwise the student classifies
    # by the anchors (PromptKD): z_s = s L2norm(P(h)) T_hat^T with a trained projector P, and
    # this gives s from the `loss` config. The frozen s T_hat is part of the exported student.
    anchor_head: Callable[[dict[str, Any]], float] | None = None
    # For a method that reads only the teacher's class distribution softmax(s t_hat T_hat^T / T):
    # (s, T) from the `loss` config. A sparse teacher cache (FKD's soft labels) stores that
    # distribution, so such a method, and only such a method, can train from one.
    teacher_distribution: Callable[[dict[str, Any]], tuple[float, float]] | None = None
    # Rules between config keys that only this method has (run by `config.validate`).
    rule: Callable[[dict[str, Any], int], Rule | None] = no_rule
    # For a CLIP student: (loss section) -> (positive words, negative words, prompt template)
    # of dual text contexts (FDBPL's): the student classifies by its own positive context in
    # place of the anchor head, and the negative one trains beside it. CNN students ignore it.
    dual_prompts: Callable[[dict[str, Any]], tuple[str, str, str]] | None = None
    flags: tuple[Flag, ...] = ()  # its own train.py flags
    # Its row of reproduce's Table 1: the config values it pins (a `Row`'s `sets`), and
    # whether it has one (False: a stage of another method, DAIT's intermediate teacher).
    table_sets: tuple[tuple[str, Any], ...] = ()
    in_table: bool = True
    # Its paper's other tables: the ablation rows beyond Table 1's, the ablation table's row
    # labels in order (Table 1's included), and its sensitivity study.
    ablations: tuple[Row, ...] = ()
    ablation_table: tuple[str, ...] = ()
    sweep: Sweep | None = None

    def anchor_head_for(self, clip_student: bool):
        """`anchor_head`, unless a CLIP student classifies by its own dual prompts."""
        return None if clip_student and self.dual_prompts else self.anchor_head

    def __post_init__(self):
        if self.teacher not in (None, *TEACHER_SIGNALS, INTERMEDIATE):
            raise ValueError(
                f"{self.name}: teacher must be None, {INTERMEDIATE!r} or one of {TEACHER_SIGNALS}"
            )
        if self.anchors not in (None, *ANCHOR_KINDS):
            raise ValueError(f"{self.name}: anchors must be None or one of {ANCHOR_KINDS}")
        if self.teacher_distribution and self.teacher != "logits":
            raise ValueError(f"{self.name}: a teacher distribution is read from its logits")
        if self.anchor_head and self.anchors is None:
            raise ValueError(f"{self.name}: a student that classifies by the anchors needs them")

    @property
    def reads_clip(self) -> bool:
        """Whether the run loads and runs (or reads the cache of) the CLIP teacher."""
        return self.teacher in TEACHER_SIGNALS

    def wants_learned_anchors(self, no_psc: bool) -> bool:
        """Whether a run reads Stage-PSC's anchors.npz (--no-psc asks for templates)."""
        return self.anchors == "learned" and not no_psc

    def table_row(self) -> Row:
        return Row(self.label, self.name, self.table_sets)
