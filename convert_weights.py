#!/usr/bin/env python
"""Converts the CLIP teacher and the students to pand_jax weights. See --help."""

from pand_jax.cli import run

if __name__ == "__main__":
    run("convert")
