"""PAND training: `python train.py --stage psc|nsd --dataset KEY`, or `--demo`. See --help."""
import sys

from pand_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
