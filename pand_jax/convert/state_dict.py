"""What the teacher (open_clip) and student (torchvision) converters share: reading PyTorch state
dicts as NumPy, checking them against what a converter expects, the PyTorch <-> Flax weight
layouts, and the relative error the --verify checks report. Safetensors files need
no torch; .bin/.pt files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np
from einops import rearrange


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message names the key and the fix."""


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Loads a .safetensors, .bin or .pt state dict as float32/int NumPy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # bf16 tensors need torch; fall through to it below
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise ConversionError(f"could not read {path}: {e}") from e
        from safetensors.torch import load_file as load_torch

        return _to_numpy(load_torch(str(path)))
    if path.suffix in (".bin", ".pt", ".pth"):
        import torch

        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"could not read {path} as a PyTorch checkpoint: {e}") from e
        for key in ("state_dict", "model"):  # training checkpoints wrap the weights
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        if not isinstance(sd, dict):
            raise ConversionError(f"{path} does not hold a state dict (found {type(sd).__name__})")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DataParallel/DDP saves
        return _to_numpy(sd)
    raise ConversionError(
        f"unsupported checkpoint format {path.suffix!r} for {path}: use .safetensors, .bin or .pt"
    )


def _to_numpy(sd: Mapping) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            v = v.float() if v.is_floating_point() else v
            v = v.numpy()
        out[k] = np.asarray(v)
    return out


def check_state_dict(
    state_dict: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    ignore: tuple[str, ...] = (),
) -> None:
    """Raises ConversionError naming missing keys, unexpected keys and shape mismatches.

    `ignore` lists key suffixes that may be present but are not converted (for example
    BatchNorm's `num_batches_tracked`).
    """
    keys = {k for k in state_dict if not k.endswith(ignore)} if ignore else set(state_dict)
    missing = sorted(set(expected_shapes) - keys)
    unexpected = sorted(keys - set(expected_shapes))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    for k in sorted(keys & set(expected_shapes)):
        got, want = tuple(np.shape(state_dict[k])), tuple(expected_shapes[k])
        if got != want:
            problems.append(f"shape mismatch for {k}: checkpoint {got}, model expects {want}")
    if problems:
        raise ConversionError(
            "the checkpoint does not match the model configuration: "
            + "; ".join(problems)
            + ". Check that --model/--model-config (or --student) names the architecture the "
            "checkpoint was trained with."
        )


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


# Layout kinds: "linear" (PyTorch [out, in] <-> Flax kernel [in, out]), "conv" (OIHW <-> HWIO; a
# depthwise [C, 1, k, k] becomes [k, k, 1, C]) and "copy" (biases, norms, embeddings).
_TO_FLAX = {"linear": (1, 0), "conv": (2, 3, 1, 0)}
_TO_TORCH = {"linear": (1, 0), "conv": (3, 2, 0, 1)}


def layout_of(ndim: int) -> str:
    """The layout kind of a weight by its rank, for models whose 4-D weights are all convs and
    2-D weights all Linear (the torchvision students)."""
    return {4: "conv", 2: "linear"}.get(ndim, "copy")


def to_flax_layout(w: np.ndarray, kind: str) -> np.ndarray:
    """A PyTorch weight in the Flax layout of `kind`."""
    return w.transpose(_TO_FLAX[kind]) if kind in _TO_FLAX else w


def to_torch_layout(w: np.ndarray, kind: str) -> np.ndarray:
    """A Flax weight back in PyTorch's layout (the inverse of `to_flax_layout`)."""
    return w.transpose(_TO_TORCH[kind]) if kind in _TO_TORCH else w


def torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The PyTorch shape of a Flax weight of `shape`."""
    return tuple(shape[i] for i in _TO_TORCH[kind]) if kind in _TO_TORCH else tuple(shape)


def relative_diff(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs diff, max abs diff / max |want|): relative to the reference's largest magnitude,
    because element-wise ratios blow up near zero."""
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    return diff, diff / max(float(np.max(np.abs(want))), 1e-30)


def nchw(images_nhwc: np.ndarray):
    """NHWC images (the Flax models' layout) as a contiguous NCHW torch tensor (PyTorch's)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rearrange(images_nhwc, "b h w c -> b c h w")))
