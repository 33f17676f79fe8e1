"""`python export.py`: see --help (pand_jax/cli/export.py)."""

from pand_jax.cli import run

if __name__ == "__main__":
    run("export")
