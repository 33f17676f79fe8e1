"""`python evaluate.py`: see --help (pand_jax/cli/evaluate.py)."""
import sys

from pand_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
