"""`python evaluate.py`: see --help (pand_jax/cli/evaluate.py)."""

from pand_jax.cli import run

if __name__ == "__main__":
    run("evaluate")
