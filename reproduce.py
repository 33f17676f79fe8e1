"""The paper's tables and figures in one command: see `python reproduce.py --help`."""
import sys

from pand_jax.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
