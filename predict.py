"""`python predict.py`: see --help (pand_jax/cli/predict.py)."""
import sys

from pand_jax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
