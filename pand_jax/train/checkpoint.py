"""Resumable training state on disk: orbax `CheckpointManager`, async, keeps the last N, and
finalises each save atomically (a run killed mid-save leaves only a tmp dir that is ignored).

A checkpoint holds the array state (params, optimizer state, BatchNorm statistics, step) and a
small JSON with the loop position (epoch, step in epoch) and the best score so far. The data
pipeline and the augmentation are pure functions of (seed, epoch, step), so this position is the
whole iterator state and the RNG state.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an async save; the training loop continues while it is written."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores into arrays with the shapes, dtypes and shardings of `like`."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; all mean the same to the user
            raise CheckpointError(
                f"could not restore checkpoint {step} in {self.directory}: {type(e).__name__}: "
                f"{e}\nThe checkpoint is corrupt or from another model configuration. Delete "
                f"{self.directory / str(step)} to resume from an earlier one, or use a new "
                "--workdir to start afresh.") from e
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
