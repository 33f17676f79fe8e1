#!/usr/bin/env python
"""Converts the CLIP teacher and the students to pand_jax weights. See --help."""
import sys

from pand_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
