"""The epoch loop both stages share: resume, progress bar, metrics one step late, evaluation
and checkpoint every epoch, a checkpoint on SIGTERM/Ctrl-C, best-epoch tracking, summary.json,
and a stop at the first step whose loss terms or gradient norm are not finite.

A stage supplies a `Task`: how many steps an epoch has, its batches from any (epoch, step),
a jitted train step, an evaluation, and what to export when the score improves. `BEFORE_STEP`
holds callables run before every training step (profilers; tests that stop a run at a known
step append to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from pand_jax.files import write_json
from pand_jax.progress import progress_bar
from pand_jax.train.checkpoint import Checkpointer
from pand_jax.train.metrics import MetricsWriter


@dataclasses.dataclass
class Task:
    name: str  # "psc" or "nsd", for messages
    steps_per_epoch: int
    global_batch_size: int
    batches: Callable[[int, int], Iterator[Any]]  # (epoch, start_step) -> device batches
    train_step: Callable[[Any, Any, int], tuple[Any, dict]]  # (state, batch, epoch)
    evaluate: Callable[[Any], dict[str, float]]  # must contain "top1" and "select"
    export_best: Callable[[Any, dict[str, float]], None]


def _jsonable(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


class _EvaluationStopped(Exception):
    """A stop asked for during an epoch's evaluation, which is abandoned."""


class _StopRequest:
    """Turns SIGTERM and a first Ctrl-C into a stop the loop takes between steps, so it can
    save a checkpoint before it exits; a second Ctrl-C interrupts at once.

    Every process of a multi-process run must stop after the same step: the checkpoint is
    written by all of them together, and a process that ran one step further would wait
    forever for the others in that step's collectives. A signal may reach only some processes
    (one preempted host) or reach them at different steps, so there JAX's preemption service
    (started by `jax.distributed.initialize`) takes SIGTERM on any process, tells the others,
    and `reached_preemption_sync_point` names the same step on all of them; Ctrl-C is passed to
    it as a SIGTERM."""

    def __init__(self):
        self.requested = False
        self.agreed = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        own = (signal.SIGINT,) if self.agreed else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in own}
        self._evaluating = False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.agreed:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption service
        elif self._evaluating:
            raise _EvaluationStopped

    @contextlib.contextmanager
    def interruptible(self):
        """A stop inside this block ends it at once with `_EvaluationStopped` (one process:
        an evaluation can take minutes on a CPU, longer than a preemption's grace period; the
        processes of a multi-process run evaluate together, and stop at the next step)."""
        if self.requested and not self.agreed:
            raise _EvaluationStopped
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False

    def after(self, global_step: int) -> bool:
        """Whether to stop after this step; every process calls it after every step."""
        if self.agreed:
            return multihost_utils.reached_preemption_sync_point(global_step)
        return self.requested

    def pending(self) -> bool:
        """A stop asked for that this process takes at once, between steps or instead of an
        evaluation (one process only: processes agree on a step, which is a training step)."""
        return self.requested and not self.agreed

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class Progress:
    """Where a run stands and what it has scored; saved with every checkpoint."""

    epoch: int = 0  # epochs done
    step: int = 0  # steps done of the epoch after them
    best_top1: float | None = None
    best_select: float = -1.0  # the selection score of the best epoch so far
    best_epoch: int | None = None  # counted from 1
    last_top1: float | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0  # timed steps (each session's first, compiling, is not)
    train_images: int = 0  # the images of the timed steps
    wall_seconds: float | None = None  # the epochs' wall time, compilation and evaluation too

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Progress:
        """From a checkpoint's JSON (an older one may lack the fields added since)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})


# Run before every training step as hook(epoch from 1, step from 0, the run's Checkpointer).
BEFORE_STEP: list[Callable[[int, int, Checkpointer], None]] = []


def fit(
    task: Task,
    state: Any,
    *,
    epochs: int,
    workdir: pathlib.Path,
    checkpoints_to_keep: int,
    summary_extra: dict | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) `epochs` epochs; returns the summary also written to summary.json."""
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(workdir / "checkpoints", checkpoints_to_keep)
    progress = Progress()
    restored = ckpt.restore_newest_good(state)
    if restored is not None:
        state, progress = restored[0], Progress.from_meta(restored[1])
        if is_main:
            print(
                f"[{task.name}] resuming from {workdir} at epoch {progress.epoch}, "
                f"step {progress.step}",
                flush=True,
            )
    run = _Run(task, epochs, workdir=workdir, ckpt=ckpt, progress=progress)
    try:
        state = run.epochs(state)
    finally:
        run.close()
    summary = {
        "stage": task.name,
        "epochs": epochs,
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "last_top1": progress.last_top1,
        "images_per_second": progress.train_images / max(progress.train_seconds, 1e-9),
        "train_seconds": progress.train_seconds,
        "wall_seconds": progress.wall_seconds,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "global_batch_size": task.global_batch_size,
        **(summary_extra or {}),
    }
    if is_main:
        write_json(workdir / "summary.json", summary)
    return summary


class _Run:
    """One session of `fit`: the epochs from `progress` on, with their metrics, checkpoints
    and stop requests."""

    def __init__(
        self,
        task: Task,
        epochs: int,
        *,
        workdir: pathlib.Path,
        ckpt: Checkpointer,
        progress: Progress,
    ):
        self.task, self.num_epochs, self.ckpt, self.progress = task, epochs, ckpt, progress
        self.is_main = jax.process_index() == 0
        done_steps = progress.epoch * task.steps_per_epoch + progress.step
        self.metrics = MetricsWriter(workdir, done_steps, progress.epoch)
        self.stop = _StopRequest()

    def close(self) -> None:
        self.stop.restore()
        self.metrics.close()
        self.ckpt.close()

    def epochs(self, state: Any) -> Any:
        task, progress = self.task, self.progress
        if self.is_main and progress.epoch < self.num_epochs:
            # XLA compiles at the first step: 30 s of silence
            print(
                f"[{task.name}] compiling the training step (first step; ~30 s on a CPU)...",
                flush=True,
            )
        while progress.epoch < self.num_epochs:
            epoch_start = time.perf_counter()
            state, stopping = self._train_epoch(state)
            # An epoch whose steps are done is evaluated, unless a stop comes first: then its
            # checkpoint holds the position (epoch, last step), and the rerun evaluates it.
            if progress.step == task.steps_per_epoch and not self.stop.pending():
                self._evaluate(state)
            # Wall time of the epochs, compilation and evaluation included, summed over sessions.
            progress.wall_seconds = (progress.wall_seconds or 0.0) + (
                time.perf_counter() - epoch_start
            )
            self.ckpt.save(
                progress.epoch * task.steps_per_epoch + progress.step,
                state,
                dataclasses.asdict(progress),
            )
            if (stopping or self.stop.pending()) and progress.epoch < self.num_epochs:
                self.ckpt.wait()
                before = " (before its evaluation)" if progress.step == task.steps_per_epoch else ""
                raise SystemExit(
                    f"[{task.name}] stopped at epoch {progress.epoch + 1}, step {progress.step}"
                    f"{before}; checkpoint saved. Run the same command again to resume."
                )
        return state

    def _train_epoch(self, state: Any) -> tuple[Any, bool]:
        """The steps of the epoch from `progress.step` on; (state, whether a stop ended it)."""
        task, progress = self.task, self.progress
        epoch, steps = progress.epoch, task.steps_per_epoch
        bar = progress_bar(
            total=steps,
            initial=progress.step,
            desc=f"{task.name} epoch {epoch + 1}/{self.num_epochs}",
            unit="step",
        )
        pending = None  # (step, device metrics): read one step late, so the host never waits
        t0, timed_images, stopping = None, 0, False
        for step, batch in enumerate(task.batches(epoch, progress.step), progress.step):
            for hook in BEFORE_STEP:
                hook(epoch + 1, step, self.ckpt)
            state, out = task.train_step(state, batch, epoch)
            if pending is not None:
                self._log_step(bar, *pending)
            pending = (epoch * steps + step, out)
            if t0 is None:  # the first step of a session includes compilation: not timed
                jax.block_until_ready(out)
                t0 = time.perf_counter()
            else:
                timed_images += task.global_batch_size
            bar.update(1)
            progress.step = step + 1
            if self.stop.after(epoch * steps + step):
                stopping = True
                break
        if pending is not None:
            self._log_step(bar, *pending)
        jax.block_until_ready(state)
        if t0 is not None and timed_images:
            progress.train_seconds += time.perf_counter() - t0
            progress.train_images += timed_images
        bar.close()
        return state, stopping

    def _evaluate(self, state: Any) -> None:
        try:
            with self.stop.interruptible():
                scores = self.task.evaluate(state)
        except _EvaluationStopped:
            return
        self._end_epoch(state, scores)

    def _log_step(self, bar, step: int, out) -> None:
        """Writes step `step`'s metrics and stops the run when one is not finite. The step after
        it has already been dispatched from its (bad) state, but no checkpoint is written before
        every step's metrics have passed through here."""
        values = {k: float(np.asarray(v)) for k, v in out.items()}
        self.metrics.write("step", step, values)
        bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in bad.items())
            epoch = step // self.task.steps_per_epoch + 1
            raise NonFiniteError(
                f"[{self.task.name}] non-finite values at step {step} (epoch {epoch}): {terms}. "
                "Stopped without saving that state; the last checkpoint holds the last good one. "
                "Lower optimizer.lr or set optimizer.grad_clip, then run again."
            )

    def _end_epoch(self, state, scores: dict[str, Any]) -> None:
        """Records an evaluated epoch, and exports its state when it is the best so far."""
        task, progress = self.task, self.progress
        scores = {k: _jsonable(v) for k, v in scores.items()}
        epoch = progress.epoch + 1  # counted from 1
        progress.last_top1 = scores["top1"]
        if scores["select"] > progress.best_select:
            progress.best_select, progress.best_top1 = scores["select"], scores["top1"]
            progress.best_epoch = epoch
            task.export_best(state, scores)
        progress.history.append({"epoch": epoch, **scores})
        progress.epoch, progress.step = epoch, 0
        self.metrics.write(
            "epoch",
            epoch * task.steps_per_epoch,
            {"epoch": epoch, **scores, "best_top1": progress.best_top1},
        )
        if self.is_main:
            print(
                f"[{task.name}] epoch {epoch}: top1 {100 * scores['top1']:.2f}% "
                f"(best {100 * progress.best_top1:.2f}% at epoch {progress.best_epoch})",
                flush=True,
            )


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm of a step is NaN or infinite."""
