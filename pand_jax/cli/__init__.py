"""The command-line tools; the top-level scripts (train.py, ...) start them through `run`."""

import importlib
import sys

from pand_jax.hugepages import relaunch_with_huge_pages


def run(command: str) -> None:
    """`python COMMAND.py ...`: restart with huge pages where they help (pand_jax/hugepages.py,
    before JAX is imported), then exit with pand_jax.cli.COMMAND's main()."""
    relaunch_with_huge_pages()
    sys.exit(importlib.import_module(f"pand_jax.cli.{command}").main())
