"""What every command-line entry point shares: one-line errors and exit code 2 for bad input."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run(fn: Callable[[], int | None]) -> int:
    """Runs `fn`; the project's errors (ValueError, RuntimeError, FileNotFoundError) say what
    was wrong and how to fix it, so they become one line on stderr and exit code 2 instead of a
    traceback. PAND_DEBUG=1 shows the traceback anyway."""
    try:
        return fn() or 0
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        if os.environ.get("PAND_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
