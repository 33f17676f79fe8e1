"""The distilled student: a torchvision backbone (ResNet-18 or MobileNet-V2) plus a linear head,
and what Stage-NSD trains around it (its method's heads).

    Student(arch, num_classes, head_dim=None, dtype=..., rngs=...)
      .features(x) -> [B, num_features] fp32 pooled penultimate features (h before L2norm)
      .feature_map(x) -> [B, H/32, W/32, num_features] the map they pool (DAIT reads it)
      __call__(x)  -> [B, num_classes] fp32 logits (z_s)
      .classifier  a Linear head, or with head_dim=D PromptKD's `AnchorClassifier` on D-wide
                   class vectors
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

from pand_jax import losses, weights
from pand_jax.models.layers import BatchNorm
from pand_jax.models.mobilenet_v2 import MobileNetV2
from pand_jax.models.resnet import ResNet18

BACKBONES = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}
ARCHS = tuple(BACKBONES)
KIND = "student"


def _torch_linear_bias_init(fan_in: int):
    """PyTorch's nn.Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the released code's new
    head is a default-initialised nn.Linear."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown student architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def _torch_linear(in_dim: int, out_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
    """fp32 nn.Linear with PyTorch's default init (kaiming_uniform a=sqrt(5) =
    U(+-1/sqrt(fan_in)) for the kernel)."""
    return nnx.Linear(in_dim, out_dim,
                      kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                      bias_init=_torch_linear_bias_init(in_dim), rngs=rngs)


class ClassVectors(nnx.Variable):
    """Frozen class vectors of an `AnchorClassifier`: saved and exported with the student, never
    trained (not an nnx.Param, so the optimiser never sees them)."""


class AnchorClassifier(nnx.Module):
    """PromptKD's classifier on the teacher's class vectors t [C, D]:

        z = s L2norm(P(h)) t_hat^T,   P = Linear(d, D) - BatchNorm - ReLU - Linear(D, D)

    `classes` holds s t_hat^T [D, C] (`set_classes`), so the exported student is one plain
    classifier: backbone, projector, normalisation and a bias-free linear map."""

    def __init__(self, in_dim: int, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc1 = _torch_linear(in_dim, dim, rngs)
        self.bn = BatchNorm(dim)
        self.fc2 = _torch_linear(dim, dim, rngs)
        self.classes = ClassVectors(jnp.zeros((dim, num_classes), jnp.float32))

    def set_classes(self, class_vectors: jax.Array, scale: float) -> None:
        self.classes[...] = scale * losses.l2_normalize(losses.fp32(class_vectors)).T

    def __call__(self, h: jax.Array) -> jax.Array:
        p = self.fc2(jax.nn.relu(self.bn(self.fc1(h))))
        return jnp.matmul(losses.l2_normalize(p), self.classes[...],
                          precision=jax.lax.Precision.HIGHEST)


class Student(nnx.Module):
    def __init__(self, arch: str, num_classes: int, *, head_dim: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        check_arch(arch)
        self.arch = arch
        self.num_classes = num_classes
        self.head_dim = head_dim
        self.backbone = BACKBONES[arch](dtype=dtype, rngs=rngs)
        self.num_features = self.backbone.num_features
        # fp32 head: it is tiny and the logits feed softmax/KL terms.
        self.classifier = (_torch_linear(self.num_features, num_classes, rngs) if head_dim is None
                           else AnchorClassifier(self.num_features, head_dim, num_classes,
                                                 rngs=rngs))

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The backbone's last map [B, H/32, W/32, num_features] (compute dtype), unpooled."""
        return self.backbone.feature_map(x)

    def features(self, x: jax.Array) -> jax.Array:
        return self.backbone(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(self.features(x))


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
    return (f"Convert them with: python convert_weights.py --student {arch} --out {path}, or "
            "train the student from scratch (no ImageNet start) with --set student_weights=null")


def load_student(path: str | pathlib.Path, dtype=jnp.float32, hint: str | None = None) -> Student:
    """A saved student (converted ImageNet weights or a trained one) in eval mode, with the head
    it was saved with: for converted weights the 1000-class ImageNet classifier. `hint` says
    how to make it again (default: convert the ImageNet weights)."""
    path = pathlib.Path(path)

    def build(meta: dict[str, Any]) -> Student:
        cfg = meta["config"]
        return Student(cfg["arch"], cfg["num_classes"], head_dim=cfg.get("head_dim"),
                       dtype=dtype, rngs=nnx.Rngs(0))

    model, _ = weights.load_module(path, build, kind=KIND, hint=hint or _missing_hint(path))
    model.eval()
    return model


def student_from_pretrained(path: str | pathlib.Path, num_classes: int, *, rngs: nnx.Rngs,
                            head_dim: int | None = None, dtype=jnp.float32) -> Student:
    """Converted backbone + a fresh `num_classes` head, in train mode (the start of Stage-NSD)."""
    pretrained = load_student(path, dtype)
    model = Student(pretrained.arch, num_classes, head_dim=head_dim, dtype=dtype, rngs=rngs)
    nnx.update(model.backbone, nnx.state(pretrained.backbone))
    model.train()
    return model


def save_student(path: str | pathlib.Path, model: Student, **meta: Any) -> pathlib.Path:
    """Saves weights + config.json ({"kind": "student", "config": {arch, num_classes[, head_dim]},
    **meta})."""
    config = {"arch": model.arch, "num_classes": model.num_classes}
    if model.head_dim is not None:
        config["head_dim"] = model.head_dim
    return weights.save_module(path, model, {"kind": KIND, "config": config, **meta})
