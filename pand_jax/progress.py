"""Progress bars for long work (training epochs, feature extraction, cache builds)."""

from __future__ import annotations

import sys

import jax
from tqdm.auto import tqdm


def progress_bar(**kwargs) -> tqdm:
    """tqdm on process 0; redrawn at most every 30 s when the output is a log file, not a
    terminal, so logs stay readable."""
    interactive = sys.stderr.isatty()
    return tqdm(
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 30.0,
        **kwargs,
    )
