"""The distilled student: a torchvision backbone (ResNet-18 or MobileNet-V2) plus a linear head,
and what Stage-NSD trains around it (its method's heads).

    Student(arch, num_classes, head_dim=None, dtype=..., rngs=...)
      .encode(x) -> (feature_map(x), features(x)) in one pass
      .features(x) -> [B, num_features] fp32 pooled penultimate features (h before L2norm)
      .feature_map(x) -> [B, H/32, W/32, num_features] the map they pool (DAIT reads it)
      __call__(x)  -> [B, num_classes] fp32 logits (z_s)
      .classifier  a Linear head, or with head_dim=D PromptKD's `heads.AnchorClassifier` on
                   D-wide class vectors
    `clip:DIR` students are `models.clip_student.CLIPStudent`s, with the same interface; saving
    and loading here take both.
    Distillee(student, heads)
      .student, and one attribute per head (`pand_jax.methods`: VL2Lite's align_image, ...)

Inputs are NHWC images normalised by the caller. Parameters and BatchNorm statistics are fp32;
`dtype` is the compute dtype of the convolutions. Train/eval through `model.train()` /
`model.eval()` (BatchNorm batch statistics vs running averages).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pand_jax import weights
from pand_jax.models import clip_student, heads
from pand_jax.models.layers import global_avg_pool
from pand_jax.models.mobilenet_v2 import MobileNetV2
from pand_jax.models.resnet import ResNet18

BACKBONES = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}
ARCHS = tuple(BACKBONES)
KIND = "student"


def check_arch(arch: str) -> None:
    """A torchvision backbone's name (a clip:DIR student is never built here)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown student architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def student_label(student: str) -> str:
    """A name for `student` in paths and tables: the architecture, or clip-NAME for clip:DIR
    (NAME the folder's name)."""
    if clip_student.is_clip(student):
        return f"{clip_student.ARCH}-{pathlib.Path(clip_student.clip_dir(student)).name}"
    return student


class Student(nnx.Module):
    def __init__(
        self,
        arch: str,
        num_classes: int,
        *,
        head_dim: int | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_arch(arch)
        self.arch = arch
        self.num_classes = num_classes
        self.head_dim = head_dim
        self.backbone = BACKBONES[arch](dtype=dtype, rngs=rngs)
        self.num_features = self.backbone.num_features
        self.classifier = heads.classifier(self.num_features, num_classes, head_dim, rngs=rngs)

    frozen: tuple[str, ...] = ()  # every part trains (`trainable`)

    def logits(self, h: jax.Array) -> jax.Array:
        """z_s of the features h."""
        return self.classifier(h)

    def negative(self, h: jax.Array) -> None:
        """A CLIP student's negative prompts' outputs; a CNN has none."""
        return None

    def folded(self) -> Student:
        """What is saved and exported: the student itself (a CLIP student folds its text)."""
        return self

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the last map, its average pool: the features h)."""
        feature_map = self.backbone.feature_map(x)
        return feature_map, global_avg_pool(feature_map)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The backbone's last map [B, H/32, W/32, num_features] (compute dtype), unpooled."""
        return self.backbone.feature_map(x)

    def features(self, x: jax.Array) -> jax.Array:
        return self.backbone(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(self.features(x))


def trainable(student) -> nnx.filterlib.Filter:
    """The filter of the parameters the optimiser trains in a Distillee of `student`: all but
    those under the student's `frozen` submodules (a CLIP student's image tower)."""
    return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(name)) for name in student.frozen))


class Distillee(nnx.Module):
    """Everything Stage-NSD trains: the student and its method's heads (VL2Lite's align MLPs,
    ...), each an attribute named as the method names it."""

    def __init__(self, student: Student, heads: dict[str, nnx.Module]):
        self.student = student
        self.head_names = tuple(heads)
        for name, head in heads.items():
            setattr(self, name, head)

    @property
    def heads(self) -> dict[str, nnx.Module]:
        return {name: getattr(self, name) for name in self.head_names}


def _missing_hint(path: pathlib.Path) -> str:
    arch = path.name if path.name in ARCHS else "|".join(ARCHS)
    return (
        f"Convert them with: python convert_weights.py --student {arch} --out {path}, or "
        "train the student from scratch (no ImageNet start) with --set student_weights=null"
    )


def load_student(path: str | pathlib.Path, dtype=jnp.float32, hint: str | None = None) -> Student:
    """A saved student (converted ImageNet weights or a trained one) in eval mode, with the head
    it was saved with: for converted weights the 1000-class ImageNet classifier. `hint` says
    how to make it again (default: convert the ImageNet weights)."""
    path = pathlib.Path(path)

    def build(meta: dict[str, Any]) -> Student:
        cfg = meta["config"]
        if cfg["arch"] == clip_student.ARCH:
            return clip_student.build(cfg, dtype)
        return Student(
            cfg["arch"],
            cfg["num_classes"],
            head_dim=cfg.get("head_dim"),
            dtype=dtype,
            rngs=nnx.Rngs(0),
        )

    model, _ = weights.load_module(path, build, kind=KIND, hint=hint or _missing_hint(path))
    model.eval()
    return model


def student_from_pretrained(
    path: str | pathlib.Path,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    head_dim: int | None = None,
    dtype=jnp.float32,
) -> Student:
    """Converted backbone + a fresh `num_classes` head, in train mode (the start of Stage-NSD)."""
    pretrained = load_student(path, dtype)
    model = Student(pretrained.arch, num_classes, head_dim=head_dim, dtype=dtype, rngs=rngs)
    nnx.update(model.backbone, nnx.state(pretrained.backbone))
    model.train()
    return model


def save_student(path: str | pathlib.Path, model: Student, **meta: Any) -> pathlib.Path:
    """Saves weights + config.json ({"kind": "student", "config": {arch, num_classes[, head_dim]},
    **meta})."""
    if model.arch == clip_student.ARCH:
        config = model.config()
    else:
        config = {"arch": model.arch, "num_classes": model.num_classes}
        if model.head_dim is not None:
            config["head_dim"] = model.head_dim
    return weights.save_module(path, model, {"kind": KIND, "config": config, **meta})
