"""Run configuration: the paper's defaults live in configs/*.json; the command line overrides
any value with `--set dotted.key=value`; the resolved config is written into the workdir.

Plain nested dicts keep the on-disk form (config.json in every run) and the in-memory form the
same, and make "which run was this" a JSON diff.
"""
from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names it and what is expected."""


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
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} in {key!r}; "
                              f"valid keys: {sorted(node)}")
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
    (workdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_same_run(workdir: pathlib.Path, config: dict[str, Any], allow_change: bool) -> None:
    """Refuses to resume a workdir whose recorded config differs, unless told to."""
    path = workdir / "config.json"
    if not path.is_file() or allow_change:
        return
    old = json.loads(path.read_text())
    # Keys a later version added are not a change: the run used what is now their default.
    old = with_defaults(old, default_config(config["stage"]))
    diffs = diff(old, config)
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
