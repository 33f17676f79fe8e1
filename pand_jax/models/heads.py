"""The classifiers a student ends in, beside its plain linear head: cosine similarity to frozen
class vectors (a CLIP student's class text features), and PromptKD's projector in front of it.

Both keep s t_hat^T [D, C] as `classes`, so an exported student is one plain classifier:
normalisation and a bias-free linear map, its class vectors folded in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pand_jax import losses
from pand_jax.models.layers import BatchNorm


def _torch_linear_bias_init(fan_in: int):
    """PyTorch's nn.Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the released code's new
    head is a default-initialised nn.Linear."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(in_dim: int, out_dim: int, rngs: nnx.Rngs) -> nnx.Linear:
    """fp32 nn.Linear with PyTorch's default init (kaiming_uniform a=sqrt(5) =
    U(+-1/sqrt(fan_in)) for the kernel)."""
    return nnx.Linear(
        in_dim,
        out_dim,
        kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=_torch_linear_bias_init(in_dim),
        rngs=rngs,
    )


class ClassVectors(nnx.Variable):
    """Frozen class vectors of a `CosineClassifier` (and what a CLIP student computes its own
    from): saved and exported with the student, never trained (not an nnx.Param, so the
    optimiser never sees them)."""


class CosineClassifier(nnx.Module):
    """z = L2norm(h) (s t_hat^T): cosine similarity to the class vectors t [C, D] times the
    scale s, as CLIP classifies an image by its class text features."""

    def __init__(self, dim: int, num_classes: int):
        self.classes = ClassVectors(jnp.zeros((dim, num_classes), jnp.float32))

    def set_classes(self, class_vectors: jax.Array, scale: float) -> None:
        self.classes[...] = scale * losses.l2_normalize(losses.fp32(class_vectors)).T

    def __call__(self, h: jax.Array, classes: jax.Array | None = None) -> jax.Array:
        """Logits of the features h [B, D]; `classes` [D, C] in place of the stored ones (a
        CLIP student's class vectors from its learned text context)."""
        return jnp.matmul(
            losses.l2_normalize(losses.fp32(h)),
            self.classes[...] if classes is None else classes,
            precision=jax.lax.Precision.HIGHEST,
        )


class AnchorClassifier(CosineClassifier):
    """PromptKD's classifier on the teacher's class vectors t [C, D]:

    z = s L2norm(P(h)) t_hat^T,   P = Linear(d, D) - BatchNorm - ReLU - Linear(D, D)"""

    def __init__(self, in_dim: int, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc1 = torch_linear(in_dim, dim, rngs)
        self.bn = BatchNorm(dim)
        self.fc2 = torch_linear(dim, dim, rngs)
        super().__init__(dim, num_classes)

    def __call__(self, h: jax.Array, classes: jax.Array | None = None) -> jax.Array:
        return super().__call__(self.fc2(jax.nn.relu(self.bn(self.fc1(h)))), classes)


def classifier(in_dim: int, num_classes: int, head_dim: int | None, *, rngs: nnx.Rngs):
    """A student's head on its d = `in_dim` features: linear, or with `head_dim` = D an
    `AnchorClassifier` (fp32: it is tiny and the logits feed softmax/KL terms)."""
    return (
        torch_linear(in_dim, num_classes, rngs)
        if head_dim is None
        else AnchorClassifier(in_dim, head_dim, num_classes, rngs=rngs)
    )
