"""Resumable training state on disk: orbax `CheckpointManager`, async, keeps the last N, and
finalises each save atomically (a run killed mid-save leaves only a tmp dir that is ignored).

A checkpoint holds the array state (params, optimizer state, BatchNorm statistics, step) and a
small JSON with the loop position (epoch, step in epoch) and the best score so far. The data
pipeline and the augmentation are pure functions of (seed, epoch, step), so this position is the
whole iterator state and the RNG state.

Faults: a checkpoint that fails to restore is moved to `checkpoints_corrupt/<step>` beside the
checkpoints (nothing is deleted) and the run resumes from the newest one that restores; a save
that runs out of disk space removes its partial directory and stops with one line that says
how much space a checkpoint needs.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import logging
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

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
        absl = logging.getLogger("absl")
        if not any(isinstance(f, _NoDiskFullLogs) for f in absl.filters):
            absl.addFilter(_NoDiskFullLogs())

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
            # The JSON is written in the background: a copy, or the loop's next changes to
            # its position dict could land in this checkpoint.
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(copy.deepcopy(meta))),
                force=True)

    def restore(self, like: Any, step: int) -> tuple[Any, dict[str, Any]]:
        """Restores into arrays with the shapes, dtypes and shardings of `like`."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        try:
            with _quiet():
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
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
            f"{self.directory} aside to start afresh.")

    def _move_aside(self, step: int, error: CheckpointError) -> None:
        if jax.process_index() == 0:
            self.corrupt_dir.mkdir(parents=True, exist_ok=True)
            target = self.corrupt_dir / str(step)
            if target.exists():  # an earlier corrupt copy of the same step
                shutil.rmtree(target)
            shutil.move(self.directory / str(step), target)
            print(f"warning: {error}; moved it to {target} and resuming from an earlier one",
                  flush=True)
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
        """Turns a full disk during an async save into one line; removes the partial save."""
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            for tmp in self.directory.glob(f"*{TMP_MARK}*"):
                shutil.rmtree(tmp, ignore_errors=True)
            step, size = self._saving or (None, 0)
            self.manager.reload()
            last = self.manager.latest_step()
            raise CheckpointError(
                f"no space left on the device to save checkpoint {step} in {self.directory} "
                f"(a checkpoint needs about {_human(size)}); free space there and run the same "
                f"command again to resume from checkpoint {last}") from None


def _human(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


class _NoDiskFullLogs(logging.Filter):
    """Drops orbax's multi-line log records of a full disk; `Checkpointer` reports it in one
    line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (_is_disk_full(error) or _is_disk_full(Exception(record.getMessage())))


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC as Python raises it, or as TensorStore reports it (RESOURCE_EXHAUSTED)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


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
