"""The demo CLIP (configs/demo.json's teacher architecture) with random weights drawn by NumPy,
for the benchmarks and the tests that need a teacher of the demo's size but not a trained one.

Drawing with NumPy into an abstract model is fast: compiling JAX's initialisers for every layer
shape would cost more CPU than the work that uses the model. bench/ scripts import it as a
sibling module (`from demo_clip import random_demo_clip`); tests/helpers.py loads this file."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pand_jax.models.clip import CLIP
from pand_jax.train import demo


def random_demo_clip() -> CLIP:
    """The demo CLIP, every parameter 0.1 N(0, 1) from NumPy seed 0, centred at 1 for the
    LayerNorm scales and 0 elsewhere."""
    cfg = demo.teacher_config(demo.demo_config()["teacher"])
    model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def draw(path, x):
        centre = 1.0 if "['scale']" in jax.tree_util.keystr(path) else 0.0  # LayerNorm scales
        return (centre + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(draw, nnx.state(model)))
    return model
