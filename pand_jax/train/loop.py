"""The epoch loop both stages share: resume, progress bar, metrics one step late, evaluation
and checkpoint every epoch, a checkpoint on SIGTERM/Ctrl-C, best-epoch tracking, summary.json,
and a stop at the first step whose loss terms or gradient norm are not finite.

A stage supplies a `Task`: how many steps an epoch has, its batches from any (epoch, step),
a jitted train step, an evaluation, and what to export when the score improves.

Test-only hook: with PAND_TEST_SIGNAL_AT=NAME:EPOCH:STEP[:PROCESS] in the environment (for
example SIGTERM:1:0:1), the loop raises signal NAME in itself just before it runs step STEP
(counted from 0) of epoch EPOCH (counted from 1), in process PROCESS only if one is given, so
the tests' preemptions and kills land at a known step instead of wherever a timer or a poll of
the output happened to put them. A SIGKILL waits for the checkpoint being written first (it
models a kill after that checkpoint landed). Nothing else reads it; runs never set it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from pand_jax.config import write_json
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
    pos = {
        "epoch": 0,
        "step": 0,
        "best_top1": None,
        "best_select": -1.0,
        "best_epoch": None,
        "last_top1": None,
        "history": [],
        "train_seconds": 0.0,
        "train_images": 0,
    }
    restored = ckpt.restore_newest_good(state)
    if restored is not None:
        state, pos = restored
        if is_main:
            print(
                f"[{task.name}] resuming from {workdir} at epoch {pos['epoch']}, "
                f"step {pos['step']}",
                flush=True,
            )
    metrics = MetricsWriter(
        workdir, pos["epoch"] * task.steps_per_epoch + pos["step"], pos["epoch"]
    )
    stop = _StopRequest()
    try:
        state = _run_epochs(task, state, pos, epochs, ckpt, metrics, stop, is_main)
    finally:
        stop.restore()
        metrics.close()
        ckpt.close()
    summary = {
        "stage": task.name,
        "epochs": epochs,
        "best_top1": pos["best_top1"],
        "best_epoch": pos["best_epoch"],
        "last_top1": pos["last_top1"],
        "images_per_second": pos["train_images"] / max(pos["train_seconds"], 1e-9),
        "train_seconds": pos["train_seconds"],
        "wall_seconds": pos.get("wall_seconds"),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "global_batch_size": task.global_batch_size,
        **(summary_extra or {}),
    }
    if is_main:
        write_json(workdir / "summary.json", summary)
    return summary


TEST_SIGNAL = "PAND_TEST_SIGNAL_AT"


def _test_signal() -> tuple[signal.Signals, int, int] | None:
    """(signal, epoch from 1, step from 0) of the test-only hook for this process, or None."""
    spec = os.environ.get(TEST_SIGNAL)
    if not spec:
        return None
    try:
        name, epoch, step, *process = spec.split(":")
        signum, epoch, step = signal.Signals[name], int(epoch), int(step)
        (process,) = [int(p) for p in process] or [jax.process_index()]
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{TEST_SIGNAL}={spec!r}: expected NAME:EPOCH:STEP[:PROCESS], for example SIGTERM:1:0"
        ) from e
    if process != jax.process_index():
        return None
    return signum, epoch, step


def _run_epochs(task, state, pos, epochs, ckpt, metrics, stop, is_main):
    spe = task.steps_per_epoch
    test_signal = _test_signal()
    if is_main and pos["epoch"] < epochs:  # XLA compiles at the first step: 30 s of silence
        print(
            f"[{task.name}] compiling the training step (first step; ~30 s on a CPU)...", flush=True
        )
    while pos["epoch"] < epochs:
        epoch, start = pos["epoch"], pos["step"]
        bar = progress_bar(
            total=spe, initial=start, desc=f"{task.name} epoch {epoch + 1}/{epochs}", unit="step"
        )
        pending = None  # (step, device metrics): read one step late, so the host never waits
        t0, timed_images, stopping = None, 0, False
        epoch_start = time.perf_counter()
        for step, batch in enumerate(task.batches(epoch, start), start):
            if test_signal is not None and test_signal[1:] == (epoch + 1, step):
                if test_signal[0] == signal.SIGKILL:
                    ckpt.wait()
                signal.raise_signal(test_signal[0])
            state, out = task.train_step(state, batch, epoch)
            if pending is not None:
                _log_step(task, metrics, bar, *pending)
            pending = (epoch * spe + step, out)
            if t0 is None:  # the first step of a session includes compilation: not timed
                jax.block_until_ready(out)
                t0 = time.perf_counter()
            else:
                timed_images += task.global_batch_size
            bar.update(1)
            pos["step"] = step + 1
            if stop.after(epoch * spe + step):
                stopping = True
                break
        if pending is not None:
            _log_step(task, metrics, bar, *pending)
        jax.block_until_ready(state)
        if t0 is not None and timed_images:
            pos["train_seconds"] += time.perf_counter() - t0
            pos["train_images"] += timed_images
        bar.close()
        # An epoch whose steps are done is evaluated, unless a stop comes first: then its
        # checkpoint holds the position (epoch, last step), and the rerun evaluates it.
        if pos["step"] == spe and not stop.pending():
            try:
                with stop.interruptible():
                    scores = task.evaluate(state)
            except _EvaluationStopped:
                pass
            else:
                _end_epoch(task, state, pos, epoch, scores, metrics, is_main)
        # Wall time of the epochs, compilation and evaluation included, summed over sessions.
        pos["wall_seconds"] = pos.get("wall_seconds", 0.0) + time.perf_counter() - epoch_start
        ckpt.save(pos["epoch"] * spe + pos["step"], state, pos)
        if (stopping or stop.pending()) and pos["epoch"] < epochs:
            ckpt.wait()
            before = " (before its evaluation)" if pos["step"] == spe else ""
            raise SystemExit(
                f"[{task.name}] stopped at epoch {pos['epoch'] + 1}, step {pos['step']}{before}; "
                "checkpoint saved. Run the same command again to resume."
            )
    return state


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm of a step is NaN or infinite."""


def _log_step(task, metrics, bar, step, out):
    """Writes step `step`'s metrics and stops the run when one is not finite. The step after
    it has already been dispatched from its (bad) state, but no checkpoint is written before
    every step's metrics have passed through here."""
    values = {k: float(np.asarray(v)) for k, v in out.items()}
    metrics.write("step", step, values)
    bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        epoch = step // task.steps_per_epoch + 1
        raise NonFiniteError(
            f"[{task.name}] non-finite values at step {step} (epoch {epoch}): {terms}. Stopped "
            "without saving that state; the last checkpoint holds the last good one. Lower "
            "optimizer.lr or set optimizer.grad_clip, then run again."
        )


def _end_epoch(task, state, pos, epoch, scores, metrics, is_main):
    scores = {k: _jsonable(v) for k, v in scores.items()}
    pos["last_top1"] = scores["top1"]
    improved = scores["select"] > pos["best_select"]
    if improved:
        pos.update(best_select=scores["select"], best_top1=scores["top1"], best_epoch=epoch + 1)
        task.export_best(state, scores)
    pos["history"].append({"epoch": epoch + 1, **scores})
    pos["epoch"], pos["step"] = epoch + 1, 0
    metrics.write(
        "epoch",
        (epoch + 1) * task.steps_per_epoch,
        {"epoch": epoch + 1, **scores, "best_top1": pos["best_top1"]},
    )
    if is_main:
        print(
            f"[{task.name}] epoch {epoch + 1}: top1 {100 * scores['top1']:.2f}% "
            f"(best {100 * pos['best_top1']:.2f}% at epoch {pos['best_epoch']})",
            flush=True,
        )
