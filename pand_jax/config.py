"""Run configuration: the paper's defaults live in configs/*.json; the command line overrides
any value with `--set dotted.key=value`; the resolved config is checked against one typed
schema (`validate`) before any work, and written into the workdir.

Plain nested dicts keep the on-disk form (config.json in every run) and the in-memory form the
same, and make "which run was this" a JSON diff. The schema (pydantic) only checks and
normalises them: types, ranges, allowed choices and the rules that tie keys together. A bound
is written once, as pydantic's `Field(gt=0)`; the words of its error message ("a number > 0")
are made from it (`_expected`). Each Stage-NSD method's `loss` section has its schema in the
method's module (`pand_jax.methods`); the caller passes them in (`Facts.loss_sections`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import annotated_types
import pydantic
from pydantic import Field

from pand_jax import files

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names it and what is expected."""


# (config key, its value, what is allowed) of a broken rule, as `validate` reports it.
Rule = tuple[str, Any, str]


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the schema needs from the layers above it, passed in by the caller: the device
    and process counts of the mesh, a dataset's number of classes, the allowed values of the
    choice keys (their lists live where they are used: `methods.NAMES`, ...), and what the
    Stage-NSD methods add: the schema of each `loss` section and the method's own rules."""

    devices: int
    processes: int
    # dataset key -> its number of classes; a ValueError saying what is valid for a bad key
    num_classes: Callable[[str], int]
    choices: dict[str, tuple[str, ...]]  # config key name -> allowed values
    loss_sections: dict[str, type[Schema]]  # `loss.NAME` -> its schema
    # the first rule of its own that Stage-NSD's method finds broken (the config, the classes)
    method_rule: Callable[[dict[str, Any], int], Rule | None]


def _choice(value: Any, info: pydantic.ValidationInfo) -> Any:
    allowed = info.context["facts"].choices[info.field_name]
    if value not in allowed:
        raise ValueError(f"expected one of {list(allowed)}")
    return value


# `student: clip:DIR`: the image tower of the converted ViT CLIP in DIR (models.clip_student).
CLIP_STUDENT = "clip:"


def _student(value: Any, info: pydantic.ValidationInfo) -> Any:
    if isinstance(value, str) and value.startswith(CLIP_STUDENT) and value != CLIP_STUDENT:
        return value
    allowed = info.context["facts"].choices[info.field_name]
    if value not in allowed:
        raise ValueError(
            f"expected one of {list(allowed)}, or {CLIP_STUDENT}DIR (a converted "
            "ViT CLIP's image tower)"
        )
    return value


def _dataset(value: str, info: pydantic.ValidationInfo) -> str:
    info.context["facts"].num_classes(value)  # raises for an unknown key or a bad folder
    return value


# Any type in: a value outside the list (even of another type) gets the list in its message.
Choice = Annotated[Any, pydantic.AfterValidator(_choice)]
StudentArch = Annotated[Any, pydantic.AfterValidator(_student)]
TEMPLATE = r"\{\}"  # a prompt template's pattern: {} where the class name goes


class Schema(pydantic.BaseModel):
    """A config section. Numbers carry their bounds (`Field(gt=0)`), and a `description` only
    what the bounds do not say (a text's form, a note); `_expected` words both."""

    # strict: JSON true is not a number and 2.0 not an integer; forbid: no unknown keys; every
    # number finite (--set takes JSON, which reads NaN and Infinity).
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Common(Schema):
    """Keys both stages share."""

    dataset: Annotated[str, pydantic.AfterValidator(_dataset)] = Field(
        description="a dataset key, or folder:PATH"
    )
    data_dir: str | None = Field(description="a path")
    train_split: str | None = Field(description="a split name, or null for the dataset's own")
    prompt_template: str | None = Field(
        pattern=TEMPLATE,
        description="a text with {} where the class name goes, or null for the dataset's own",
    )
    skip_bad_images: bool
    teacher: str = Field(description="a path")
    teacher_sharding: Choice
    seed: int = Field(ge=0)
    dtype: Choice
    epochs: int = Field(ge=1)
    checkpoints_to_keep: int = Field(ge=1)
    max_steps_per_epoch: int | None = Field(ge=1)


class PSCOptimizer(Schema):
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    schedule: Literal["cosine", "constant"]
    grad_clip: float | None = Field(gt=0)


class PSCConfig(_Common):
    stage: Literal["psc"]
    n_ctx: int = Field(ge=1)
    ctx_init_std: float = Field(ge=0)
    batch_size: int = Field(ge=1)
    # The teacher refuses a size its image tower cannot take (`CLIPConfig.check_image_size`).
    feature_image_size: int = Field(ge=1)
    feature_batch_size: int = Field(ge=1)
    optimizer: PSCOptimizer


class NSDOptimizer(Schema):
    name: Literal["adamw", "sgd"]
    momentum: float = Field(ge=0, lt=1)  # SGD's
    warmup_epochs: int = Field(ge=0)
    warmup_lr: float = Field(gt=0)
    lr: float = Field(gt=0)
    end_lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    schedule: Literal["cosine", "cosine_periodic"]
    t_max_epochs: int = Field(ge=1)
    grad_clip: float | None = Field(gt=0)
    eps: float = Field(gt=0)


class NSDConfig(_Common):
    stage: Literal["nsd"]
    student: StudentArch
    student_weights: str | None = Field(description="a path")
    # A CLIP student's VPT-deep prompts (n tokens at each of the first D layers) and what trains.
    student_prompt_tokens: int = Field(ge=1)
    student_prompt_depth: int = Field(ge=1)
    student_train: Choice
    # CoOp context vectors on a CLIP student's own text tower (0: its template's features).
    student_text_context: int = Field(ge=0)
    method: Choice
    anchors: str | None = Field(description="a path")
    unlabeled_data: str | None = Field(
        pattern=r"^folder:.+", description="folder:DIR (images in any layout, no labels)"
    )
    intermediate_teacher: str | None = Field(description="a path")
    it_student: Choice
    no_psc: bool
    # BatchNorm statistics of a single example are degenerate, and RKD needs pairs.
    batch_size: int = Field(ge=2)
    eval_batch_size: int = Field(ge=1)
    host_image_size: int = Field(ge=1)
    # The teacher sees the student's view and refuses a size its tower cannot take.
    image_size: int = Field(ge=1)
    host_cache: bool
    host_cache_dir: str | None = Field(description="a path")
    augment: Choice
    teacher_cache: int = Field(ge=0, description="(views; 0: online teacher)")
    teacher_cache_dir: str | None = Field(description="a path")
    loss: dict[str, Any]  # replaced by the methods' sections (`_nsd_schema`)
    optimizer: NSDOptimizer
    teacher_cache_online: bool
    teacher_cache_dtype: Choice
    # What the teacher cache stores: embeddings, or FKD's sparse labels (`pand_jax.soft_labels`);
    # the K of ms and mr (hard keeps 1).
    soft_labels: Choice
    soft_labels_k: int = Field(ge=1)


class DemoTeacherConfig(Schema):
    """configs/demo.json's teacher section (the tiny CLIP the demo trains first)."""

    model: dict[str, Any] = Field(description="a CLIP architecture (embed_dim, vision, text)")
    seed: int = Field(ge=0)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    captions: list[str] = Field(min_length=1, description="a non-empty list of caption templates")


@functools.cache
def _nsd_schema(sections: tuple[tuple[str, type[Schema]], ...]) -> type[NSDConfig]:
    """NSDConfig with a `loss` of the shared `scale` and one section per method."""
    loss = pydantic.create_model(
        "NSDLoss",
        __base__=Schema,
        scale=(float, Field(gt=0)),
        **{name: (schema, ...) for name, schema in sections},
    )
    return pydantic.create_model("NSDConfig", __base__=NSDConfig, loss=(loss, ...))


def _schema(stage: str, facts: Facts) -> type[Schema]:
    if stage == "nsd":
        return _nsd_schema(tuple(sorted(facts.loss_sections.items())))
    return {"psc": PSCConfig, "demo_teacher": DemoTeacherConfig}[stage]


def validate(config: dict[str, Any], facts: Facts, schema: str) -> dict[str, Any]:
    """The checked, normalised config (ints where integers belong, floats for numbers), or a
    ConfigError of one line naming the first bad key, its value and what is allowed.
    `schema`: "psc", "nsd" or "demo_teacher"."""
    model = _schema(schema, facts)
    try:
        checked = model.model_validate(config, context={"facts": facts})
    except pydantic.ValidationError as e:
        raise ConfigError(_message(model, e.errors()[0])) from None
    rule = _broken_rule(checked, facts)
    if rule:
        key, value, expected = rule
        raise ConfigError(f"config {key} = {value!r}: expected {expected}")
    return checked.model_dump()


def _message(model: type[Schema], err: dict[str, Any]) -> str:
    """The one line of a pydantic error."""
    key, expected = _describe(model, err["loc"])
    if err["type"] == "value_error":  # our validators say what is allowed themselves
        return f"config {key} = {err['input']!r}: {err['ctx']['error']}"
    if err["type"] == "finite_number":
        return f"config {key} = {err['input']!r}: expected a finite number, {expected}"
    if err["type"] == "missing":
        return f"config {key} is missing: expected {expected}"
    if err["type"] == "extra_forbidden":  # a key the schema lacks (configs/*.json has it)
        return f"unknown config key {'.'.join(map(str, err['loc']))!r}"
    return f"config {key} = {err['input']!r}: expected {expected}"


def _describe(model: type[pydantic.BaseModel], loc: tuple) -> tuple[str, str]:
    """(dotted key, what it allows) of an error location; list indices and pydantic's union
    branch names after the key are dropped."""
    names, expected = [], "a valid value"
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        names.append(part)
        expected = _expected(field)
        if not (
            isinstance(field.annotation, type) and issubclass(field.annotation, pydantic.BaseModel)
        ):
            break
        model = field.annotation
    return ".".join(names), expected


_BOUND_WORDS = {
    annotated_types.Gt: "> {}",
    annotated_types.Ge: ">= {}",
    annotated_types.Lt: "< {}",
    annotated_types.Le: "<= {}",
}


def _expected(field: pydantic.fields.FieldInfo) -> str:
    """What a field allows, in words made from its type and bounds: "a number > 0", "an integer
    >= 1", "a number in [0, 1)", "one of ['a', 'b']", "true or false", each with ", or null"
    when None is allowed. A text's words are its description; a number's description is a
    note after them."""
    annotation, nullable = field.annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, nullable = args[0], len(args) < len(typing.get_args(annotation))
    if annotation in (int, float):
        words = _number_words(annotation, field.metadata) + ", or null" * nullable
        return words + (f" {field.description}" if field.description else "")
    if annotation is bool:
        words = "true or false"
    elif typing.get_origin(annotation) is Literal:
        words = f"one of {list(typing.get_args(annotation))}"
    else:
        words = field.description or "a valid value"
    return words + ", or null" * (nullable and "null" not in words)


def _number_words(annotation: type, metadata: list) -> str:
    noun = "an integer" if annotation is int else "a number"
    # annotated_types' Gt holds its bound as .gt, Ge as .ge, ...
    bounds = {
        type(m): getattr(m, type(m).__name__.lower()) for m in metadata if type(m) in _BOUND_WORDS
    }
    low = bounds.get(annotated_types.Ge, bounds.get(annotated_types.Gt))
    high = bounds.get(annotated_types.Le, bounds.get(annotated_types.Lt))
    if low is not None and high is not None:
        left = "[" if annotated_types.Ge in bounds else "("
        right = "]" if annotated_types.Le in bounds else ")"
        return f"{noun} in {left}{low}, {high}{right}"
    return " ".join([noun] + [_BOUND_WORDS[kind].format(v) for kind, v in bounds.items()])


def _broken_rule(cfg: pydantic.BaseModel, facts: Facts) -> Rule | None:
    """(key, value, what is allowed) of the first rule between keys that `cfg` breaks."""
    if not isinstance(cfg, _Common):  # the demo teacher's keys are independent
        return None
    mesh = f"a multiple of the {facts.devices} devices (the batch is split evenly over them)"
    batches = [("batch_size", cfg.batch_size)]
    batches += (
        [("feature_batch_size", cfg.feature_batch_size)]
        if cfg.stage == "psc"
        else [("eval_batch_size", cfg.eval_batch_size)]
    )
    for key, batch in batches:
        if batch % facts.devices:
            return key, batch, mesh
    if cfg.batch_size % facts.processes:
        return "batch_size", cfg.batch_size, f"a multiple of the {facts.processes} processes"
    if cfg.stage == "psc":
        return None
    if cfg.image_size > cfg.host_image_size:
        return (
            "image_size",
            cfg.image_size,
            f"<= host_image_size ({cfg.host_image_size}), the size images are stored at",
        )
    if cfg.optimizer.end_lr > cfg.optimizer.lr:
        return "optimizer.end_lr", cfg.optimizer.end_lr, f"<= optimizer.lr ({cfg.optimizer.lr})"
    if cfg.anchors and cfg.no_psc:
        return "anchors", cfg.anchors, "null with no_psc = true (--anchors and --no-psc contradict)"
    return facts.method_rule(cfg.model_dump(), facts.num_classes(cfg.dataset))


@functools.cache
def _history() -> dict[str, Any]:
    """configs/renamed.json: the keys renamed or removed since runs were first written, and
    values renamed since (old -> new): a workdir's config.json holding them reads as today's
    spelling, and `--set` takes the old one too."""
    return json.loads((CONFIG_DIR / "renamed.json").read_text())


def _renamed(key: str) -> str:
    return _history()["keys"].get(key, key)


def migrate(config: dict[str, Any]) -> dict[str, Any]:
    """A config recorded by an earlier version, with renamed keys moved, removed ones gone and
    renamed values spelled as today."""
    config = copy.deepcopy(config)
    history = _history()
    for key in history["removed"]:
        config.pop(key, None)
    for old, new in history["keys"].items():
        *parents, leaf = old.split(".")
        node = _node(config, parents)
        if isinstance(node, dict) and leaf in node and not isinstance(node[leaf], dict):
            value = node.pop(leaf)
            *new_parents, new_leaf = new.split(".")
            target = config
            for part in new_parents:
                target = target.setdefault(part, {})
            target[new_leaf] = value
    for key, renames in history["values"].items():
        *parents, leaf = key.split(".")
        node = _node(config, parents)
        if isinstance(node, dict) and node.get(leaf) in renames:
            node[leaf] = renames[node[leaf]]
    return config


def _node(config: dict[str, Any], parents: list[str]) -> Any:
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def recorded_config(workdir: pathlib.Path, stage: str) -> dict[str, Any]:
    """A workdir's config.json as this version reads it: migrated, and keys added since taken
    as their defaults (the run used what is now their default)."""
    old = json.loads((workdir / "config.json").read_text())
    return with_defaults(migrate(old), default_config(stage))


def demo_config() -> dict[str, Any]:
    """configs/demo.json: the offline demo's teacher, psc and nsd sections, and reproduce.py
    --demo's scale."""
    return json.loads((CONFIG_DIR / "demo.json").read_text())


def apply_recipe(config: dict[str, Any], name: str) -> dict[str, Any]:
    """`config` with configs/recipes/NAME.json's values (dotted key -> value; "_about" says what
    it is) set, as --set would set them."""
    path = CONFIG_DIR / "recipes" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "recipes").glob("*.json"))
        raise ConfigError(f"unknown recipe {name!r}; expected one of {known}")
    config = copy.deepcopy(config)
    for key, value in json.loads(path.read_text()).items():
        if not key.startswith("_"):
            override(config, key, value)
    return config


STAGES = ("psc", "nsd")


def default_config(stage: str) -> dict[str, Any]:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    return json.loads((CONFIG_DIR / f"{stage}.json").read_text())


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false/null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def override(config: dict[str, Any], key: str, value: Any) -> None:
    """Sets `a.b.c` in place; unknown keys are an error listing the valid ones at that level."""
    *parents, leaf = _renamed(key).split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise ConfigError(
                f"unknown config key {'.'.join(parents[: i + 1])!r} in {key!r}; "
                f"valid keys: {sorted(node)}"
            )
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")
    if isinstance(node[leaf], dict):
        raise ConfigError(f"{key!r} is a group; set one of its keys: {sorted(node[leaf])}")
    node[leaf] = value


def apply_sets(config: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        override(config, key.strip(), parse_value(text))
    return config


def canonical_key(key: str) -> str:
    """Today's spelling of a dotted key that may be an old one."""
    return _renamed(key)


def flatten(d: dict[str, Any], prefix: str = ""):
    """(dotted key, value) of every leaf, as `override` and `--set` name them."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def write_config(workdir: pathlib.Path, config: dict[str, Any]) -> None:
    files.write_json(workdir / "config.json", config, sort_keys=True)


def check_same_run(workdir: pathlib.Path, config: dict[str, Any], allow_change: bool) -> None:
    """Refuses to resume a workdir whose recorded config differs, unless told to."""
    path = workdir / "config.json"
    if not path.is_file() or allow_change:
        return
    diffs = diff(recorded_config(workdir, config["stage"]), config)
    if diffs:
        lines = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
        raise ConfigError(
            f"{workdir} holds a run with a different config:\n  {lines}\n"
            "Use a new --workdir, or pass --allow-config-change to resume it with the new values."
        )


def with_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`config` with every key it lacks taken from `defaults`, recursively."""
    out = dict(config)
    for key, value in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
    return out


def diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]
