"""The command-line tools; the top-level scripts (train.py, ...) start them through `run`."""

import importlib
import sys

from pand_jax.hugepages import relaunch_with_huge_pages
from pand_jax.xla_cpu import prefer_eigen_convolutions


def start() -> None:
    """What every command-line tool and bench script does first, before JAX starts a backend:
    XLA:CPU's convolution option (pand_jax/xla_cpu.py), then the restart with huge pages where
    they help (pand_jax/hugepages.py; the restarted process inherits the option)."""
    prefer_eigen_convolutions()
    relaunch_with_huge_pages()


def run(command: str) -> None:
    """`python COMMAND.py ...`: `start`, then exit with pand_jax.cli.COMMAND's main()."""
    start()
    sys.exit(importlib.import_module(f"pand_jax.cli.{command}").main())
