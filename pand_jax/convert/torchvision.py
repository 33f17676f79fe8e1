"""torchvision ResNet-18 / MobileNet-V2 ImageNet weights -> the Flax `Student`, and back
(`nnx_to_torchvision`, for exporting a trained student).

The NNX parameter paths mirror torchvision's keys (see models/resnet.py), so conversion is:
drop the `backbone` prefix, map the head (`classifier` -> `fc` / `classifier.1`), rename the
leaves (kernel/scale -> weight, mean/var -> running_mean/var) and transpose layouts
(conv OIHW -> HWIO, linear [out, in] -> [in, out]).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from pand_jax import files
from pand_jax.convert.state_dict import (
    ConversionError,
    check_state_dict,
    layout_of,
    nchw,
    read_state_dict,
    relative_diff,
    to_flax_layout,
    to_torch_layout,
    torch_shape,
)
from pand_jax.models.student import Student, check_arch, save_student

TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V1",
}
HEAD = {"resnet18": "fc", "mobilenet_v2": "classifier.1"}
LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "classes": "weight",
}
# An AnchorClassifier head as torch's nn.Sequential: its index of each part (2 is the ReLU); the
# class vectors are the weight of the last, bias-free linear map after the L2 normalisation.
ANCHOR_HEAD = {"fc1": "0", "bn": "1", "fc2": "3", "classes": "4"}
IMAGENET_CLASSES = 1000
# Relative max-abs difference allowed by --verify (fp32, highest matmul precision); a correct
# port is ~1e-6, a wrong padding or BN detail is >1e-2.
VERIFY_TOLERANCE = 1e-4
VERIFY_IMAGE_SIZE = 224
VERIFY_BATCH = 2


def torch_key(arch: str, path: tuple) -> str:
    """NNX state path -> torchvision state-dict key."""
    *module, leaf = path
    if module[:1] == ["classifier"]:
        module = [HEAD[arch], *(ANCHOR_HEAD[m] for m in module[1:] + [leaf] if m in ANCHOR_HEAD)]
    else:
        module = module[1:]  # drop "backbone"
    return ".".join([*map(str, module), LEAF[leaf]])


def _head_shape(arch: str, state_dict: Mapping[str, np.ndarray]) -> tuple[int, int | None]:
    """(num_classes, head_dim: None for a linear head), read from the head so that fine-tuned
    checkpoints and exported anchor-head students convert too."""
    anchor = state_dict.get(f"{HEAD[arch]}.{ANCHOR_HEAD['classes']}.weight")
    if anchor is not None:
        return int(anchor.shape[0]), int(anchor.shape[1])
    head = state_dict.get(f"{HEAD[arch]}.weight")
    return (
        int(head.shape[0]) if head is not None and np.ndim(head) == 2 else IMAGENET_CLASSES
    ), None


def cosine_head(dim: int, num_classes: int):
    """`heads.CosineClassifier` in torch: L2 normalisation, then the frozen s t_hat as the
    weight of a bias-free linear map (a buffer, never a parameter)."""
    import torch

    class Classes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(num_classes, dim))

        def forward(self, x):
            return torch.nn.functional.linear(torch.nn.functional.normalize(x, dim=1), self.weight)

    return Classes()


def anchor_head(in_dim: int, head_dim: int, num_classes: int):
    """`heads.AnchorClassifier` in torch: Linear(d, D) - BatchNorm1d - ReLU - Linear(D, D) -
    L2 normalisation - the class vectors (indices as ANCHOR_HEAD names them)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, head_dim),
        torch.nn.BatchNorm1d(head_dim),
        torch.nn.ReLU(),
        torch.nn.Linear(head_dim, head_dim),
        cosine_head(head_dim, num_classes),
    )


def torchvision_student(arch: str, num_classes: int, head_dim: int | None = None):
    """`torchvision.models.<arch>(num_classes)`, its head an `anchor_head` when `head_dim` is
    set."""
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if head_dim is not None:
        d = tv.get_submodule(HEAD[arch]).in_features
        tv.set_submodule(HEAD[arch], anchor_head(d, head_dim, num_classes))
    return tv


def torchvision_to_nnx(arch: str, state_dict: Mapping[str, np.ndarray]) -> dict:
    """A torchvision state dict (NumPy or torch tensors) -> the pure state dict of
    `Student(arch, num_classes)` (`nnx.to_pure_dict` layout). Raises ConversionError naming
    missing/unexpected keys and shape mismatches."""
    check_arch(arch)
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    num_classes, head_dim = _head_shape(arch, state_dict)
    abstract = nnx.eval_shape(
        lambda: Student(arch, num_classes, head_dim=head_dim, rngs=nnx.Rngs(0))
    )
    targets = flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    keys = {path: torch_key(arch, path) for path in targets}
    check_state_dict(
        state_dict,
        {keys[p]: torch_shape(t.shape, layout_of(len(t.shape))) for p, t in targets.items()},
        ignore=("num_batches_tracked",),
    )

    def convert(w: np.ndarray) -> np.ndarray:
        return to_flax_layout(w, layout_of(w.ndim)).astype(np.float32)

    return unflatten_dict({p: convert(state_dict[keys[p]]) for p in targets})


def nnx_to_torchvision(student: Student) -> dict[str, np.ndarray]:
    """The inverse of `torchvision_to_nnx`: a Student's weights and BatchNorm running statistics
    as the float32 NumPy state dict of `torchvision.models.<arch>(num_classes=C)`, with the
    `num_batches_tracked` counters torchvision's BatchNorm keeps. They only matter for
    BatchNorm with momentum=None, which torchvision's models do not use; the Student does not
    count batches, so they are 0."""
    state_dict = {}
    for path, w in flatten_dict(nnx.to_pure_dict(nnx.state(student))).items():
        # np.array copies: writable, C-contiguous arrays that torch.from_numpy takes as they are.
        state_dict[torch_key(student.arch, path)] = np.array(
            to_torch_layout(np.asarray(w), layout_of(np.ndim(w))), np.float32
        )
    for key in [k for k in state_dict if k.endswith(".running_mean")]:
        state_dict[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros(
            (), np.int64
        )
    return state_dict


def student_from_state_dict(arch: str, state_dict: Mapping[str, np.ndarray]) -> Student:
    """The converted Student in eval mode (fp32)."""
    pure = torchvision_to_nnx(arch, state_dict)
    num_classes, head_dim = _head_shape(arch, state_dict)
    model = Student(arch, num_classes, head_dim=head_dim, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    model.eval()
    return model


def _download(arch: str) -> tuple[dict[str, np.ndarray], str]:
    """torchvision's IMAGENET1K_V1 weights through torch.hub's cache (the file torchvision
    uses)."""
    import torch
    import torchvision

    url = torchvision.models.get_weight(TORCHVISION_WEIGHTS[arch]).url
    path = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)
        print(f"downloading {url} -> {path}")
        try:
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None)
        except Exception as e:  # urllib, ssl and hash errors all mean "could not get the file"
            raise ConversionError(
                f"could not download the {arch} weights from {url} ({type(e).__name__}: {e}). "
                f"Offline? Fetch that file elsewhere and pass it with --checkpoint FILE."
            ) from e
    return read_state_dict(path), url


def convert_student(
    arch: str,
    checkpoint: str | pathlib.Path | None = None,
    out: str | pathlib.Path | None = None,
    verify: bool = False,
) -> pathlib.Path:
    """Converts torchvision weights for `arch` and saves them under `out` (default weights/ARCH).

    Without `checkpoint` the IMAGENET1K_V1 weights are downloaded; with it nothing touches the
    network. `verify` compares the result with torchvision on random images."""
    check_arch(arch)
    if checkpoint is None:
        state_dict, source = _download(arch)
    else:
        state_dict, source = read_state_dict(checkpoint), str(pathlib.Path(checkpoint).absolute())
    model = student_from_state_dict(arch, state_dict)
    if verify:
        verify_student(arch, model, state_dict)
    out = pathlib.Path("weights") / arch if out is None else pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out) as tmp:  # a run stopped while saving leaves `out` as it was
        save_student(tmp, model, source=source)
    out = out.absolute()
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{arch}: {n:,} parameters ({model.num_classes} classes) saved to {out}")
    return out


def torchvision_model(arch: str, state_dict: Mapping[str, Any]):
    """The torchvision reference built from the same weights, in eval mode."""
    import torch

    tv = torchvision_student(arch, *_head_shape(arch, state_dict))
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
    missing, unexpected = tv.load_state_dict(tensors, strict=False)
    if [k for k in missing if not k.endswith("num_batches_tracked")] or unexpected:
        raise ConversionError(
            f"torchvision {arch} rejects the checkpoint: missing {missing}, unexpected {unexpected}"
        )
    return tv.eval()


def torchvision_outputs(tv, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, pooled features) from a torchvision classifier; features are the head's input."""
    import torch

    head = tv.fc if hasattr(tv, "fc") else tv.classifier
    captured = {}
    handle = head.register_forward_pre_hook(lambda _, args: captured.update(features=args[0]))
    try:
        with torch.no_grad():
            logits = tv(nchw(images_nhwc))
    finally:
        handle.remove()
    return logits.numpy(), captured["features"].detach().numpy()


def verify_student(arch: str, model: Student, state_dict: Mapping[str, np.ndarray]) -> None:
    """Runs the Flax and torchvision models on the same random images, prints the differences of
    logits and features and raises ConversionError above VERIFY_TOLERANCE."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal(
        (VERIFY_BATCH, VERIFY_IMAGE_SIZE, VERIFY_IMAGE_SIZE, 3), np.float32
    )
    want_logits, want_features = torchvision_outputs(torchvision_model(arch, state_dict), images)
    with jax.default_matmul_precision("highest"):
        features = nnx.jit(lambda m, x: m.features(x))(model, images)
        logits = model.classifier(features)
    worst = 0.0
    for name, got, want in (("logits", logits, want_logits), ("features", features, want_features)):
        abs_diff, rel_diff = relative_diff(got, want)
        worst = max(worst, rel_diff)
        print(f"verify {arch} {name}: max abs diff {abs_diff:.3e}, relative {rel_diff:.3e}")
    if worst > VERIFY_TOLERANCE:
        raise ConversionError(
            f"{arch}: Flax and torchvision disagree (relative {worst:.3e} > {VERIFY_TOLERANCE:g}); "
            "the conversion is wrong, do not use these weights."
        )
