"""What every command-line entry point shares: one-line errors and exit code 2 for bad input."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run(fn: Callable[[], int | None]) -> int:
    """Runs `fn`; the project's errors (ValueError, RuntimeError, and OSErrors such as a missing
    file or a refused write, which name the path) say what was wrong and how to fix it, so they
    become one line on stderr and exit code 2 instead of a traceback. PAND_DEBUG=1 shows the
    traceback anyway."""
    try:
        return fn() or 0
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("PAND_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def stop_on_sigterm(what: str, enabled: bool = True):
    """From the first moment of a run, SIGTERM ends it with one line instead of a silent exit
    143; the training loop installs its own handler (a checkpoint, then the same kind of line)
    while it runs. Work done before the loop keeps what it finished (the teacher cache its
    chunks). The previous handler is back when the block ends."""

    def stop(signum, frame):
        raise SystemExit(
            f"{what} stopped by SIGTERM before training began; run the same command again to resume"
        )

    previous = signal.signal(signal.SIGTERM, stop) if enabled else None
    try:
        yield
    finally:
        if enabled:
            signal.signal(signal.SIGTERM, previous)
