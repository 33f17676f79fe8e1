"""Exporting a trained student for PyTorch (a torchvision state dict) and ONNX.

Both formats take NCHW float32 images normalised with CLIP's mean and std at the student's image
size and return logits; a JSON file beside the model (FILE.json, so that student.pt and
student.onnx in one folder each keep their own) records the architecture, classes and
preprocessing.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any

from pand_jax.convert import clip_student as clip_torch
from pand_jax.convert.torchvision import nnx_to_torchvision, torchvision_student
from pand_jax.data import augment
from pand_jax.deploy import student as student_lib
from pand_jax.models import clip_student

FORMATS = ("torchvision", "onnx")
FILE_NAMES = {"torchvision": "student.pt", "onnx": "student.onnx"}  # in an --out folder
# An --out path ending so names the model file itself (the spelling of earlier versions).
MODEL_SUFFIXES = (".pt", ".pth", ".onnx")
ONNX_OPSET = 17


def _head(model) -> str:
    c, d = model.num_classes, model.head_dim
    if d is not None:
        return (
            f"anchor head: Linear(d, {d}) - BatchNorm1d - ReLU - Linear - L2 normalisation - "
            f"class vectors [{c}, {d}] (pand_jax.convert.torchvision.anchor_head)"
        )
    if model.arch == clip_student.ARCH:
        return (
            f"cosine: L2 normalisation - class text features times the logit scale "
            f"[{c}, {model.embed_dim}] (pand_jax.convert.torchvision.cosine_head)"
        )
    return "linear"


def metadata(student: student_lib.TrainedStudent, fmt: str) -> dict[str, Any]:
    size = student.image_size
    m = student.model
    return {
        "format": fmt,
        "arch": m.arch,
        "num_classes": m.num_classes,
        "head": _head(m),
        **(
            {
                "model": "pand_jax.convert.clip_student.torch_student: open_clip's ViT image tower "
                f"with {m.prompt_tokens} visual prompt tokens at each of its first "
                f"{m.prompt_depth} layers",
                "clip_student": m.config(),
            }
            if m.arch == clip_student.ARCH
            else {}
        ),
        "class_names": student.class_names,
        "image_size": size,
        "mean": augment.CLIP_MEAN.tolist(),
        "std": augment.CLIP_STD.tolist(),
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", 3, size, size],
            "normalisation": "(rgb / 255 - mean) / std",
            "resize": f"stretch the RGB image to {size}x{size} (bilinear, antialiased)",
        },
        "output": "logits [batch, num_classes]",
        "dataset": student.meta.get("dataset"),
        "top1": student.meta.get("top1"),
    }


def torchvision_model(student: student_lib.TrainedStudent):
    """The student as a torchvision model in eval mode, loaded strictly (a CLIP student as
    `convert.clip_student.torch_student`)."""
    import torch

    m = student.model
    if m.arch == clip_student.ARCH:
        return clip_torch.torch_student(m)
    tv = torchvision_student(m.arch, m.num_classes, m.head_dim)
    tv.load_state_dict(
        {k: torch.from_numpy(v) for k, v in nnx_to_torchvision(student.model).items()}
    )
    return tv.eval()


def model_path(out: str | pathlib.Path, fmt: str) -> pathlib.Path:
    """The model file for `--out`: a folder gets FILE_NAMES[fmt] inside it; a path ending in a
    model suffix is the file."""
    out = pathlib.Path(out)
    return out if out.suffix in MODEL_SUFFIXES else out / FILE_NAMES[fmt]


def export(
    student: student_lib.TrainedStudent, fmt: str, out: str | pathlib.Path
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes the model into the folder `out` (or to the file `out`, see `model_path`) and its
    metadata beside it; returns (model, metadata) paths."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = model_path(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tv = torchvision_model(student)
    if fmt == "torchvision":
        torch.save(tv.state_dict(), out)
    else:
        size = student.image_size
        example = torch.zeros(1, 3, size, size)
        # The TorchScript exporter (dynamo=False) needs no package beyond torch and is exact for
        # these plain conv nets; torch 2.12 warns that it is deprecated.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # A CLIP student's attention: shape checks traced as constants, which they are.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                tv,
                (example,),
                str(out),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(metadata(student, fmt), indent=2) + "\n")
    return out, sidecar
