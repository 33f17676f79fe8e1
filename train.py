"""PAND training: `python train.py --stage psc|nsd --dataset KEY`, or `--demo`. See --help."""

from pand_jax.cli import run

if __name__ == "__main__":
    run("train")
