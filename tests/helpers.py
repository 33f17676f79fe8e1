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


def cli_error(capsys) -> str:
    """What a command-line entry point wrote to stderr, asserted to be its one-line error (no
    traceback)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def random_open_clip(name: str, seed: int):
    """(open_clip model `name` with every parameter drawn from `seed`, its state dict)."""
    from pand_jax.convert import open_clip as oc

    torch_model = oc.build_torch_model(name, seed=seed)
    oc.randomize_torch_model(torch_model, seed=seed)
    return torch_model, torch_state_dict(torch_model)


def open_clip_checkpoint(path, name: str, seed: int) -> dict[str, np.ndarray]:
    """`random_open_clip(name, seed)`'s state dict written to `path` as safetensors; returned."""
    from safetensors.numpy import save_file

    _, sd = random_open_clip(name, seed)
    save_file(sd, str(path))
    return sd


def random_demo_clip():
    """bench/demo_clip.py's `random_demo_clip()`: the demo CLIP with NumPy-drawn random weights.
    Its one copy lives in bench/ because the bench scripts, run as files, reach only their own
    folder and pand_jax; the file is loaded here by its path (bench/ is no package)."""
    import importlib.util
    import pathlib
    import sys

    name = "bench_demo_clip"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "demo_clip.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].random_demo_clip()
