"""Saving and loading converted weights: an orbax checkpoint of an NNX module's state plus a
small `config.json` that says how to rebuild the module.

One place for this so the teacher converter, the student converter and the trainer's exported
models all write the same layout:

    DIR/config.json     {"kind": ..., "config": {...}, ...}   (JSON, human-readable)
    DIR/state/          orbax checkpoint of the module's pure state dict
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from pand_jax import files

CONFIG_FILE = "config.json"
STATE_DIR = "state"


class WeightsError(RuntimeError):
    """Weights that are missing, corrupt or of the wrong kind; the message says how to fix it."""


def save_module(path: str | pathlib.Path, module: nnx.Module, meta: dict[str, Any]) -> pathlib.Path:
    """Writes `module`'s state (every nnx.Variable) and `meta` under `path`, replacing what was
    there only once the new copy is complete: it is written beside `path` and renamed into
    place, so a kill at any moment leaves the previous copy readable (`existing`)."""
    path = pathlib.Path(path).absolute()
    partial, previous = _beside(path, "partial"), _beside(path, "previous")
    is_main = jax.process_index() == 0
    if is_main:
        if not path.exists() and previous.exists():  # a kill between the renames below
            os.replace(previous, path)
        shutil.rmtree(partial, ignore_errors=True)
    _sync("weights: partial cleared")
    pure = nnx.to_pure_dict(nnx.state(module))
    files.quiet_refusal_logs()
    try:
        # Synchronous (collective: every process calls it): an async checkpointer's thread
        # could still be reporting a refused write while the interpreter shuts down.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(partial / STATE_DIR, args=ocp.args.StandardSave(pure), force=True)
        if is_main:
            (partial / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except Exception as e:
        if files.refusal(e) is None:
            raise
        if is_main:  # the previous copy at `path` is untouched
            shutil.rmtree(partial, ignore_errors=True)
        raise files.disk_full_error(
            e, path, sum(x.nbytes for x in jax.tree.leaves(pure)), "the weights"
        ) from e
    if is_main:
        # A folder cannot be renamed over another: the old copy steps aside, then is removed.
        if path.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
        os.replace(partial, path)
        shutil.rmtree(previous, ignore_errors=True)
    _sync("weights: published")
    return path


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _beside(path: pathlib.Path, kind: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{kind}")


def existing(path: str | pathlib.Path) -> pathlib.Path:
    """`path`, or the complete copy a kill during `save_module` left beside it."""
    path = pathlib.Path(path)
    previous = _beside(path.absolute(), "previous")
    return previous if not path.exists() and (previous / CONFIG_FILE).is_file() else path


def read_meta(path: str | pathlib.Path, kind: str | None = None, hint: str = "") -> dict[str, Any]:
    """The JSON written next to the weights; checks it is of `kind` when given."""
    path = existing(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise WeightsError(
            f"no converted weights at {path} (missing {CONFIG_FILE})."
            + (f" {hint}" if hint else "")
        )
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg} is not valid JSON ({e}); convert the weights again.") from e
    if kind is not None and meta.get("kind") != kind:
        raise WeightsError(f"{path} holds weights of kind {meta.get('kind')!r}, expected {kind!r}.")
    return meta


def load_module(
    path: str | pathlib.Path,
    build: Callable[[dict[str, Any]], nnx.Module],
    kind: str | None = None,
    hint: str = "",
) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuilds a module saved by `save_module`.

    `build(meta)` constructs the module; it runs under `nnx.eval_shape`, so no memory is spent on
    a random initialisation that the checkpoint then overwrites.
    """
    path = existing(path).absolute()
    meta = read_meta(path, kind, hint)
    abstract = nnx.eval_shape(lambda: build(meta))
    graphdef, abstract_state = nnx.split(abstract)
    target = jax.tree.map(lambda x: np.zeros((), x.dtype), nnx.to_pure_dict(abstract_state))
    # Plain NumPy on every process: converted weights are replicated host data, so no device
    # layout from the saving process (nor any collective) is involved in reading them.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            pure = ckptr.restore(
                path / STATE_DIR,
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
            )
    except Exception as e:  # orbax raises many types; all mean the same thing to the user
        raise WeightsError(
            f"could not read the weights in {path / STATE_DIR}: {type(e).__name__}: {e}. "
            "The checkpoint is corrupt or was written for another configuration; convert again."
            + (f" {hint}" if hint else "")
        ) from e
    _check_shapes(pure, nnx.to_pure_dict(abstract_state), path, hint)
    nnx.replace_by_pure_dict(abstract_state, pure)
    return nnx.merge(graphdef, abstract_state), meta


def _check_shapes(pure, expected, path, hint: str) -> None:
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree.leaves_with_path(pure)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(expected)}
    bad = [f"{k}: stored {got.get(k)}, model {want[k]}" for k in want if got.get(k) != want[k]]
    if bad:
        raise WeightsError(
            f"the weights in {path} do not fit the model in their config.json: "
            + "; ".join(bad[:5])
            + ". Convert again."
            + (f" {hint}" if hint else "")
        )
