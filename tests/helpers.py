"""Helpers several test files share that the package itself never needs."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def torch_state_dict(model) -> dict[str, np.ndarray]:
    """A PyTorch module's state dict as float32 NumPy arrays, the form the converters read."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def jit_call(fn, model, *args):
    """fn(model, *args) compiled: op-by-op dispatch of a model is slow on CPU, in bf16 most."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


def clip_embed(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


def max_rel(a, b) -> float:
    """max |a - b| over max |b|."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def classes_info(num_classes: int):
    """What `nsd.build_model` reads of a dataset for a CNN student: its class count (a CLIP
    student also reads the class names and prompt template)."""
    import types

    return types.SimpleNamespace(
        num_classes=num_classes,
        key="test",
        class_names=[f"class {i}" for i in range(num_classes)],
        prompt_template="a photo of a {}.",
    )
