"""`python predict.py`: see --help (pand_jax/cli/predict.py)."""

from pand_jax.cli import run

if __name__ == "__main__":
    run("predict")
