"""Metrics a researcher can plot: `metrics.jsonl` (one JSON object per line, `kind` = "step"
or "epoch") and the same scalars as TensorBoard events (tensorboardX needs no TensorFlow).
Only process 0 writes. A disk that refuses a write stops the run at that step with one line
(`files.DiskFullError`), and metrics.jsonl keeps only whole records.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from pand_jax import files


class MetricsWriter:
    """Appends to metrics.jsonl. A resumed run first drops what it is about to write again: the
    step records from `done_steps` on and the epoch records after `done_epochs` (written after
    its checkpoint by the run that stopped), so each step and epoch is there once."""

    def __init__(self, workdir: pathlib.Path, done_steps: int = 0, done_epochs: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path, self.tb_dir = workdir / "metrics.jsonl", workdir / "tensorboard"
        if self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines(keepends=True)
                if _before(line, done_steps, done_epochs)
            ]
            files.write_file(self.path, "".join(kept), "the metrics")
        # Unbuffered: each record reaches the disk (or fails) in the step that wrote it.
        self.file = open(self.path, "ab", buffering=0)
        self.size = self.file.seek(0, 2)
        # tensorboardX's SummaryWriter writes from a thread that dies on a full disk, and the
        # next writes then block forever on its queue: its event file writer is used directly.
        from tensorboardX.event_file_writer import EventsWriter

        with files.disk_full_errors(self.tb_dir, 4096, "the TensorBoard events in"):
            self.tb_dir.mkdir(exist_ok=True)
            # The pid in the name: a rerun within the same second would overwrite the file.
            self.tb = EventsWriter(str(self.tb_dir / "events"), f".{os.getpid()}")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in values.items()}
        line = (json.dumps({"kind": kind, "step": step, **values}) + "\n").encode()
        with files.disk_full_errors(self.path, len(line), f"the metrics of step {step} to"):
            try:
                view = memoryview(line)
                while view:  # a disk filling up mid-record writes part of it, then refuses
                    view = view[self.file.write(view) :]
            except OSError:
                self.file.truncate(self.size)  # whole records only
                raise
        self.size += len(line)
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        events = [
            Event(wall_time=time.time(), step=step, summary=scalar(f"{kind}/{k}", v))
            for k, v in values.items()
            if isinstance(v, float) and math.isfinite(v)
        ]
        with files.disk_full_errors(
            self.tb_dir,
            sum(e.ByteSize() + 16 for e in events),
            f"the TensorBoard events of step {step} in",
        ):
            for event in events:
                self.tb.write_event(event)
            if kind == "epoch":  # buffered between epochs; a step's few records are small
                self.tb.flush()

    def close(self) -> None:
        """Closes the files. Runs while another error may be on its way out (the loop calls it
        in a `finally`), so a refused last flush of the events is a warning, not a new error
        in front of the first one; metrics.jsonl has every record already."""
        if self.enabled:
            self.file.close()
            try:
                with files.disk_full_errors(self.tb_dir, 4096, "the TensorBoard events in"):
                    self.tb.close()
            except files.DiskFullError as e:
                print(f"warning: {e}", flush=True)


def _before(line: str, done_steps: int, done_epochs: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # a line cut short by a kill
        return False
    if record.get("kind") == "epoch":
        return record.get("epoch", 0) <= done_epochs
    return record.get("step", 0) < done_steps


def _scalar(v: Any) -> Any:
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    return float(np.asarray(v))
