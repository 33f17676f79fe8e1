"""`python export.py`: see --help (pand_jax/cli/export.py)."""
import sys

from pand_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
