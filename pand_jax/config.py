"""Run configuration: the paper's defaults live in configs/*.json; the command line overrides
any value with `--set dotted.key=value`; the resolved config is checked against one typed
schema (`validate`) before any work, and written into the workdir.

Plain nested dicts keep the on-disk form (config.json in every run) and the in-memory form the
same, and make "which run was this" a JSON diff. The schema (pydantic) only checks and
normalises them: types, ranges, allowed choices and the rules that tie keys together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from pand_jax import files

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names it and what is expected."""


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the schema needs from the layers above it, passed in by the caller: the device
    and process counts of the mesh, a dataset's number of classes, and the allowed values of
    the choice keys, whose lists live where they are used (`methods.NAMES`, ...), and what
    the Stage-NSD method needs (`pand_jax.methods`)."""

    devices: int
    processes: int
    # dataset key -> its number of classes; a ValueError saying what is valid for a bad key
    num_classes: Callable[[str], int]
    choices: dict[str, tuple[str, ...]]  # config key name -> allowed values
    # Stage-NSD's method: does it run the teacher; the first rule of its own it breaks (a
    # (key, value, expected) triple, given the config and the dataset's number of classes).
    teacher_needed: Callable[[str], bool]
    method_rule: Callable[[dict[str, Any], int], tuple[str, Any, str] | None]


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


def _key(description: str, **bounds: Any) -> Any:
    """A config key; `description` says what is allowed, and is the error message's end."""
    return Field(description=description, **bounds)


# The teacher's ConvNeXt reduces its input 32-fold (stem /4, three downsamples /2).
TEACHER_MIN_SIZE = "an integer >= 32 (the teacher's ConvNeXt reduces its input 32-fold)"


def _positive_int(description: str = "an integer >= 1") -> Any:
    return _key(description, ge=1)


# Any type in: a value outside the list (even of another type) gets the list in its message.
Choice = Annotated[Any, pydantic.AfterValidator(_choice)]
StudentArch = Annotated[Any, pydantic.AfterValidator(_student)]
OptionalPath = Annotated[str | None, Field(description="a path, or null")]
PositiveOrNone = Annotated[float, Field(gt=0)] | None


class _Schema(pydantic.BaseModel):
    # strict: JSON true is not a number and 2.0 not an integer; forbid: no unknown keys; every
    # number finite (--set takes JSON, which reads NaN and Infinity).
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Common(_Schema):
    """Keys both stages share."""

    dataset: Annotated[str, pydantic.AfterValidator(_dataset)] = _key(
        "a dataset key, or folder:PATH"
    )
    data_dir: OptionalPath
    train_split: str | None = _key("a split name, or null for the dataset's own")
    prompt_template: Annotated[str, Field(pattern=r"\{\}")] | None = _key(
        "a text with {} where the class name goes, or null for the dataset's own"
    )
    skip_bad_images: bool = _key("true or false")
    teacher: str = _key("a path")
    teacher_sharding: Choice
    seed: int = _key("an integer >= 0", ge=0)
    dtype: Choice
    epochs: int = _positive_int()
    checkpoints_to_keep: int = _positive_int()
    max_steps_per_epoch: Annotated[int, Field(ge=1)] | None = _key("an integer >= 1, or null")


class PSCOptimizer(_Schema):
    lr: float = _key("a number > 0", gt=0)
    momentum: float = _key("a number in [0, 1)", ge=0, lt=1)
    weight_decay: float = _key("a number >= 0", ge=0)
    schedule: Literal["cosine", "constant"] = _key("one of ['cosine', 'constant']")
    grad_clip: PositiveOrNone = _key("a number > 0, or null")


class PSCConfig(_Common):
    stage: Literal["psc"] = _key("'psc'")
    n_ctx: int = _positive_int()
    ctx_init_std: float = _key("a number >= 0", ge=0)
    batch_size: int = _positive_int()
    feature_image_size: int = _key(TEACHER_MIN_SIZE, ge=32)
    feature_batch_size: int = _positive_int()
    optimizer: PSCOptimizer


class KDLoss(_Schema):
    temperature: float = _key("a number > 0", gt=0)


class RKDLoss(_Schema):
    distance_weight: float = _key("a number >= 0", ge=0)
    angle_weight: float = _key("a number >= 0", ge=0)


class VL2LiteLoss(_Schema):
    tau: float = _key("a number > 0", gt=0)
    cls_offset: float = _key("a number in [0, 1]", ge=0, le=1)
    txt_reduction: Choice


class PANDLoss(_Schema):
    lambda_nsd: float = _key("a number >= 0", ge=0)
    nsd_form: Choice
    nsd_k: int = _positive_int()
    nsd_group_size: Annotated[int, Field(ge=2)] | None = _key(
        "an integer >= 2 that divides batch_size, or null for the whole batch"
    )


class PromptKDWeights(_Schema):
    model_config = pydantic.ConfigDict(extra="allow")  # any dataset key, and "default"
    default: float = _key("a number > 0", gt=0)

    @pydantic.model_validator(mode="after")
    def _positive(self):
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"weight_by_dataset.{key} = {value!r}: expected a number > 0")
        return self


class PromptKDLoss(_Schema):
    weight: PositiveOrNone = _key("a number > 0, or null for weight_by_dataset's")
    weight_by_dataset: PromptKDWeights
    temperature: float = _key("a number > 0", gt=0)
    logit_scale: float = _key("a number > 0", gt=0)


class FDBPLLoss(_Schema):
    logit_scale: float = _key("a number > 0", gt=0)
    temperature: float = _key("a number > 0", gt=0)
    forward_weight: float = _key("a number >= 0", ge=0)
    reverse_weight: float = _key("a number >= 0", ge=0)
    # A CLIP student's dual prompts: the words its positive and negative text contexts start
    # from, the prompt around them, and the negative path's weights.
    positive_init: str = _key("a non-empty text", min_length=1)
    negative_init: str = _key("a non-empty text", min_length=1)
    prompt_template: Annotated[str, Field(pattern=r"\{\}")] = _key(
        "a text with {} where the class name goes"
    )
    negative_weight: float = _key("a number >= 0", ge=0)
    cosine_weight: float = _key("a number >= 0", ge=0)
    cascade_weight: float = _key("a number >= 0", ge=0)


class DAITLoss(_Schema):
    alpha: float = _key("a number >= 0", ge=0)
    beta: float = _key("a number >= 0", ge=0)
    gamma: float = _key("a number >= 0", ge=0)
    delta: float = _key("a number >= 0", ge=0)
    temperature: float = _key("a number > 0", gt=0)
    logit_scale: float = _key("a number > 0", gt=0)


class NSDLoss(_Schema):
    """One section per method (`pand_jax.methods` names the sections each reads)."""

    scale: float = _key("a number > 0", gt=0)
    kd: KDLoss
    rkd: RKDLoss
    vl2lite: VL2LiteLoss
    pand: PANDLoss
    promptkd: PromptKDLoss
    fdbpl: FDBPLLoss
    dait: DAITLoss


class NSDOptimizer(_Schema):
    name: Literal["adamw", "sgd"] = _key("one of ['adamw', 'sgd']")
    momentum: float = _key("a number in [0, 1)", ge=0, lt=1)  # SGD's
    warmup_epochs: int = _key("an integer >= 0", ge=0)
    warmup_lr: float = _key("a number > 0", gt=0)
    lr: float = _key("a number > 0", gt=0)
    end_lr: float = _key("a number >= 0", ge=0)
    weight_decay: float = _key("a number >= 0", ge=0)
    schedule: Literal["cosine", "cosine_periodic"] = _key("one of ['cosine', 'cosine_periodic']")
    t_max_epochs: int = _positive_int()
    grad_clip: PositiveOrNone = _key("a number > 0, or null")
    eps: float = _key("a number > 0", gt=0)


class NSDConfig(_Common):
    stage: Literal["nsd"] = _key("'nsd'")
    student: StudentArch
    student_weights: OptionalPath
    # A CLIP student's VPT-deep prompts (n tokens at each of the first D layers) and what trains.
    student_prompt_tokens: int = _positive_int()
    student_prompt_depth: int = _positive_int()
    student_train: Choice
    # CoOp context vectors on a CLIP student's own text tower (0: its template's features).
    student_text_context: int = _key("an integer >= 0", ge=0)
    method: Choice
    anchors: OptionalPath
    unlabeled_data: Annotated[str, Field(pattern=r"^folder:.+")] | None = _key(
        "folder:DIR (images in any layout, no labels), or null"
    )
    intermediate_teacher: OptionalPath
    it_student: Choice
    no_psc: bool = _key("true or false")
    # BatchNorm statistics of a single example are degenerate, and RKD needs pairs.
    batch_size: int = _key("an integer >= 2", ge=2)
    eval_batch_size: int = _positive_int()
    host_image_size: int = _positive_int()
    image_size: int = _positive_int()
    host_cache: bool = _key("true or false")
    host_cache_dir: OptionalPath
    augment: Choice
    teacher_cache: int = _key("an integer >= 0 (views; 0: online teacher)", ge=0)
    teacher_cache_dir: OptionalPath
    loss: NSDLoss
    optimizer: NSDOptimizer
    teacher_cache_online: bool = _key("true or false")
    teacher_cache_dtype: Choice
    # What the teacher cache stores: embeddings, or FKD's sparse labels (`pand_jax.soft_labels`);
    # the K of ms and mr (hard keeps 1).
    soft_labels: Choice
    soft_labels_k: int = _positive_int()


class DemoTeacherConfig(_Schema):
    """configs/demo.json's teacher section (the tiny CLIP the demo trains first)."""

    model: dict[str, Any] = _key("a CLIP architecture (embed_dim, vision, text)")
    seed: int = _key("an integer >= 0", ge=0)
    steps: int = _positive_int()
    batch_size: int = _positive_int()
    lr: float = _key("a number > 0", gt=0)
    weight_decay: float = _key("a number >= 0", ge=0)
    captions: list[str] = _key("a non-empty list of caption templates", min_length=1)


SCHEMAS = {"psc": PSCConfig, "nsd": NSDConfig, "demo_teacher": DemoTeacherConfig}


def validate(config: dict[str, Any], facts: Facts, schema: str) -> dict[str, Any]:
    """The checked, normalised config (ints where integers belong, floats for numbers), or a
    ConfigError of one line naming the first bad key, its value and what is allowed.
    `schema`: "psc", "nsd" or "demo_teacher"."""
    model = SCHEMAS[schema]
    try:
        checked = model.model_validate(config, context={"facts": facts})
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key, expected = _describe(model, err["loc"])
        if err["type"] == "value_error":  # our validators say what is allowed themselves
            raise ConfigError(f"config {key} = {err['input']!r}: {err['ctx']['error']}") from None
        if err["type"] == "finite_number":
            raise ConfigError(
                f"config {key} = {err['input']!r}: expected a finite number, {expected}"
            ) from None
        if err["type"] == "missing":
            raise ConfigError(f"config {key} is missing: expected {expected}") from None
        if err["type"] == "extra_forbidden":  # a key the schema lacks (configs/*.json has it)
            raise ConfigError(f"unknown config key {'.'.join(map(str, err['loc']))!r}") from None
        raise ConfigError(f"config {key} = {err['input']!r}: expected {expected}") from None
    rule = _broken_rule(checked, facts)
    if rule:
        key, value, expected = rule
        raise ConfigError(f"config {key} = {value!r}: expected {expected}")
    return checked.model_dump()


def _describe(model: type[pydantic.BaseModel], loc: tuple) -> tuple[str, str]:
    """(dotted key, what it allows) of an error location; list indices and pydantic's union
    branch names after the key are dropped."""
    names, expected = [], "a valid value"
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        names.append(part)
        expected = field.description or expected
        if not (
            isinstance(field.annotation, type) and issubclass(field.annotation, pydantic.BaseModel)
        ):
            break
        model = field.annotation
    return ".".join(names), expected


def _broken_rule(c: pydantic.BaseModel, facts: Facts) -> tuple[str, Any, str] | None:
    """(key, value, what is allowed) of the first rule between keys that `c` breaks."""
    if not isinstance(c, _Common):  # the demo teacher's keys are independent
        return None
    mesh = f"a multiple of the {facts.devices} devices (the batch is split evenly over them)"
    batches = [("batch_size", c.batch_size)]
    batches += (
        [("feature_batch_size", c.feature_batch_size)]
        if c.stage == "psc"
        else [("eval_batch_size", c.eval_batch_size)]
    )
    for key, batch in batches:
        if batch % facts.devices:
            return key, batch, mesh
    if c.batch_size % facts.processes:
        return "batch_size", c.batch_size, f"a multiple of the {facts.processes} processes"
    if c.stage == "psc":
        return None

    if c.image_size > c.host_image_size:
        return (
            "image_size",
            c.image_size,
            f"<= host_image_size ({c.host_image_size}), the size images are stored at",
        )
    if facts.teacher_needed(c.method) and c.image_size < 32:  # it sees the student's view
        return "image_size", c.image_size, TEACHER_MIN_SIZE
    if c.optimizer.end_lr > c.optimizer.lr:
        return "optimizer.end_lr", c.optimizer.end_lr, f"<= optimizer.lr ({c.optimizer.lr})"
    if c.anchors and c.no_psc:
        return "anchors", c.anchors, "null with no_psc = true (--anchors and --no-psc contradict)"
    return facts.method_rule(c.model_dump(), facts.num_classes(c.dataset))


# Keys renamed since runs were first written (old dotted key -> new): a workdir's config.json
# holding them reads as the new spelling, and `--set` takes the old one too.
RENAMED = {
    "loss.kd_temperature": "loss.kd.temperature",
    "loss.rkd_distance_weight": "loss.rkd.distance_weight",
    "loss.rkd_angle_weight": "loss.rkd.angle_weight",
    **{f"loss.{k}": f"loss.vl2lite.{k}" for k in ("tau", "cls_offset", "txt_reduction")},
    **{
        f"loss.{k}": f"loss.pand.{k}" for k in ("lambda_nsd", "nsd_form", "nsd_k", "nsd_group_size")
    },
}
# Keys dropped since: `align_dim` could only equal the student's feature width.
REMOVED = ("align_dim",)


def migrate(config: dict[str, Any]) -> dict[str, Any]:
    """A config recorded by an earlier version, with renamed keys moved and removed ones gone."""
    config = copy.deepcopy(config)
    for key in REMOVED:
        config.pop(key, None)
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and not isinstance(node[leaf], dict):
            value = node.pop(leaf)
            *new_parents, new_leaf = new.split(".")
            target = config
            for part in new_parents:
                target = target.setdefault(part, {})
            target[new_leaf] = value
    return config


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


def default_config(stage: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{stage}.json"
    if not path.is_file():
        stages = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"unknown stage {stage!r}; expected one of {stages}")
    return json.loads(path.read_text())


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false/null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def override(config: dict[str, Any], key: str, value: Any) -> None:
    """Sets `a.b.c` in place; unknown keys are an error listing the valid ones at that level."""
    *parents, leaf = RENAMED.get(key, key).split(".")
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


def flatten(d: dict[str, Any], prefix: str = ""):
    """(dotted key, value) of every leaf, as `override` and `--set` name them."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def write_config(workdir: pathlib.Path, config: dict[str, Any]) -> None:
    write_json(workdir / "config.json", config, sort_keys=True)


def write_json(path: pathlib.Path, data: Any, **dumps_kwargs: Any) -> None:
    """Writes `path` whole or not at all (`files.atomic_path`): the other processes of a run,
    or a later reader, never see it half written."""
    with files.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, **dumps_kwargs) + "\n")


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
