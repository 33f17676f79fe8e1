"""The paper's tables and figures in one command: see `python reproduce.py --help`."""

from pand_jax.cli import run

if __name__ == "__main__":
    run("reproduce")
