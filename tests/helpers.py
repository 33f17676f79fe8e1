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


# The released PyTorch losses of the general-purpose KD methods, transcribed line for line
# (tensors in, tensor out): the loss references and the step-parity objectives share them.


def torch_standardize(z):
    """logit-standardization-KD's `normalize` (mdistiller/distillers/KD.py there)."""
    return (z - z.mean(dim=-1, keepdims=True)) / (1e-7 + z.std(dim=-1, keepdims=True))


def torch_dkd(zs, zt, y, alpha, beta, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py)."""
    import torch
    import torch.nn.functional as F

    gt = torch.zeros_like(zs).scatter_(1, y.unsqueeze(1), 1).bool()
    other = torch.ones_like(zs).scatter_(1, y.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt).sum(1, keepdims=True), (t * other).sum(1, keepdims=True)], 1)

    p_s = cat_mask(F.softmax(zs / temperature, 1))
    p_t = cat_mask(F.softmax(zt / temperature, 1))
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * temperature**2 / len(y)
    p_t2 = F.softmax(zt / temperature - 1000.0 * gt, 1)
    log_p_s2 = F.log_softmax(zs / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / len(y)
    return alpha * tckd + beta * nckd


def torch_dist(zs, zt, beta, gamma, tau):
    """torchdistill's DISTLoss.forward (torchdistill/losses/mid_level.py)."""
    import torch.nn.functional as F

    y_s, y_t = (zs / tau).softmax(dim=1), (zt / tau).softmax(dim=1)

    def pearson(a, b):
        return F.cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps=1e-8)

    inter = tau**2 * (1 - pearson(y_s, y_t).mean())
    intra = tau**2 * (1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra
