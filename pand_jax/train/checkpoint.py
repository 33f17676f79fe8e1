"""Resumable training state on disk: orbax `CheckpointManager`, async, keeps the last N, and
finalises each save atomically (a run killed mid-save leaves only a tmp dir that is ignored).

A checkpoint holds the array state (params, optimizer state, BatchNorm statistics, step) and a
small JSON with the loop position (epoch, step in epoch) and the best score so far. The data
pipeline and the augmentation are pure functions of (seed, epoch, step), so this position is the
whole iterator state and the RNG state.

Faults: a checkpoint that fails to restore is moved to `checkpoints_corrupt/<step>` beside the
checkpoints (nothing is deleted) and the run resumes from the newest one that restores; a save
that the disk refuses (full, over quota, past the file-size limit) stops the run at the step of
that save, before it is started in the background, with one line that says how much space a
checkpoint needs; a refusal that still comes in the background removes the partial directory
and is reported the same way at the next save or at the end.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pand_jax import files

# orbax marks a save in progress with this in the directory name (atomic rename when done).
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self.corrupt_dir = self.directory.with_name(self.directory.name + "_corrupt")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )
        self._saving: tuple[int, int] | None = None  # (step, bytes) of the last save started
        files.quiet_refusal_logs()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an async save; the training loop continues while it is written. A failure
        of the previous save surfaces here or in `wait`/`close`."""
        with self._disk_errors():
            # orbax waits here for the previous save anyway; doing it first lets a failure
            # of that save be reported with its own step.
            self.manager.wait_until_finished()
            if step in self.manager.all_steps():
                # Saved before its epoch's evaluation (a stop came first), restored, and now
                # evaluated: the arrays on disk are these. Replacing it would leave a moment
                # with no checkpoint of this step; keeping it costs at most a second
                # evaluation of the epoch if the run dies before its next save.
                return
            self._saving = (step, sum(x.nbytes for x in jax.tree.leaves(state)))
            self._reserve(self._saving[1])
            # The JSON is written in the background: a copy, or the loop's next changes to
            # its position dict could land in this checkpoint.
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(copy.deepcopy(meta))
                ),
                force=True,
            )

    def _reserve(self, size: int) -> None:
        """Raises the disk's refusal now when a checkpoint of `size` bytes does not fit: in the
        background it would surface only at the next save, an epoch of training later. Process
        0 asks (a disk all processes share would be asked for N checkpoints at once) and every
        process gets its answer, since orbax's save is collective: all start it or none."""
        refused = None
        if jax.process_index() == 0:
            try:
                files.reserve(self.directory, size)
            except OSError as e:
                if files.refusal(e) is None:
                    raise
                refused = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            code = multihost_utils.broadcast_one_to_all(
                np.int32(refused.errno if refused is not None else 0)
            )
            if refused is None and int(code):
                refused = OSError(int(code), "refused on process 0")
        if refused is not None:
            raise refused

    def restore(self, like: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """Restores into arrays with the shapes, dtypes and shardings of `like`."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
        try:
            with _quiet():
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                    ),
                )
        except Exception as e:  # orbax raises many types; all mean the same to the user
            first_line = (str(e).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(f"checkpoint {step}: {type(e).__name__}: {first_line}") from e
        return out["state"], out["meta"]

    def restore_newest_good(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
        """(state, meta) of the newest checkpoint that restores, or None when there is none.
        Newer ones that fail are moved aside with a warning; when none restores, nothing is
        moved (they may be fine for another model configuration) and CheckpointError says so."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(like, step)
            except CheckpointError as e:
                failed.append((step, e))
                continue
            for bad, error in failed:
                self._move_aside(bad, error)
            return restored
        if not failed:
            return None
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored (newest: {failed[0][1]}); they "
            "are corrupt or from another model configuration.\nUse a new --workdir, or move "
            f"{self.directory} aside to start afresh."
        )

    def _move_aside(self, step: int, error: CheckpointError) -> None:
        if jax.process_index() == 0:
            self.corrupt_dir.mkdir(parents=True, exist_ok=True)
            target = self.corrupt_dir / str(step)
            if target.exists():  # an earlier corrupt copy of the same step
                shutil.rmtree(target)
            shutil.move(self.directory / str(step), target)
            print(
                f"warning: {error}; moved it to {target} and resuming from an earlier one",
                flush=True,
            )
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoint: moved aside")
        self.manager.reload()

    def wait(self) -> None:
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _disk_errors(self):
        """Turns a save the disk refused into one line; removes the partial save."""
        try:
            yield
        except Exception as e:
            if files.refusal(e) is None:
                raise
            for tmp in self.directory.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(tmp, ignore_errors=True)
            step, size = self._saving or (None, 0)
            self.manager.reload()
            last = self.manager.latest_step()
            then = (
                f"resume from checkpoint {last}"
                if last is not None
                else "start afresh (no checkpoint was complete yet)"
            )
            raise files.disk_full_error(
                e,
                self.directory,
                size,
                f"checkpoint {step} in",
                fix=f"free space there and run the same command again to {then}",
                needs="a checkpoint",
            ) from None


@contextlib.contextmanager
def _quiet():
    """Keeps orbax's and asyncio's log lines about a failed restore off the console: the
    CheckpointError raised instead says it in one line."""
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
