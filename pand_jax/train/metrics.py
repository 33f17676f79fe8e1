"""Metrics a researcher can plot: `metrics.jsonl` (one JSON object per line, `kind` = "step"
or "epoch") and the same scalars as TensorBoard events (tensorboardX needs no TensorFlow).
Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.file = open(workdir / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in values.items()}
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _scalar(v: Any) -> Any:
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    return float(np.asarray(v))
