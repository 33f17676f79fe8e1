"""PAND (Prompt-Aware Neighborhood Distillation) in JAX/Flax.

Importing the package changes no environment variable: the command-line tools set what the CPU
needs before JAX starts (`pand_jax.cli.start`: `pand_jax.xla_cpu`, `pand_jax.hugepages`).
"""
