"""Layers shared by the teacher towers and the students, each written once.

- `layer_norm`, `gelu`: the ConvNeXt image tower and the CLIP towers (open_clip/timm).
- `quick_gelu`, `ResidualAttentionBlock`: open_clip's transformer block, which the CLIP text
  tower (causal) and the ViT image tower (bidirectional) share.
- `BatchNorm`, `conv`, `Sequential`, `global_avg_pool`: the torchvision students.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from pand_jax.models.conv import conv_general_dilated


def layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance like torch: the fast E[x^2]-E[x]^2 form loses digits on the large,
    # offset activations of deep ConvNeXt stages.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    # open_clip/timm use nn.GELU(): the exact erf form. The tanh approximation costs ~2e-4 rel.
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    # OpenAI's CLIP activation: its weights (open_clip's -quickgelu configs) were trained with
    # it, and exact GELU in its place moves their features by ~1e-2.
    return x * jax.nn.sigmoid(1.702 * x)


class Attention(nnx.Module):
    """`torch.nn.MultiheadAttention` as open_clip uses it: q;k;v fused in `in_proj`, then
    `out_proj`."""

    def __init__(self, width: int, heads: int, causal: bool, *, dtype, rngs: nnx.Rngs):
        self.in_proj = nnx.Linear(width, 3 * width, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.heads = heads
        self.causal = causal

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        q, k, v = (
            rearrange(t, "b n (heads d) -> b n heads d", heads=self.heads) for t in (q, k, v)
        )
        # Softmax runs in float32 inside dot_product_attention whatever the input dtype.
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(rearrange(y, "b n heads d -> b n (heads d)"))


class ResidualAttentionBlock(nnx.Module):
    """open_clip's pre-LN block `x + attn(ln_1 x)`, `x + mlp(ln_2 x)` with a 4x MLP. The residual
    stream stays float32; matmuls and attention run in `dtype`."""

    def __init__(
        self,
        width: int,
        heads: int,
        eps: float,
        *,
        causal: bool,
        quick: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.ln_1 = layer_norm(width, eps, dtype, rngs)
        self.attn = Attention(width, heads, causal, dtype=dtype, rngs=rngs)
        self.ln_2 = layer_norm(width, eps, dtype, rngs)
        self.mlp_c_fc = nnx.Linear(width, 4 * width, dtype=dtype, rngs=rngs)
        self.mlp_c_proj = nnx.Linear(4 * width, width, dtype=dtype, rngs=rngs)
        self.quick = quick

    def __call__(self, x: jax.Array) -> jax.Array:
        act = quick_gelu if self.quick else gelu
        x = x + self.attn(self.ln_1(x)).astype(jnp.float32)
        return x + self.mlp_c_proj(act(self.mlp_c_fc(self.ln_2(x)))).astype(jnp.float32)


# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu), untruncated.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nnx.Module):
    """PyTorch `BatchNorm2d` (eps 1e-5, momentum 0.1 = Flax momentum 0.9) over the last axis.

    Written instead of using `nnx.BatchNorm` because PyTorch updates `running_var` with the
    UNBIASED batch variance (times n / (n - 1)) while normalising with the biased one; Flax stores
    the biased variance, so its running statistics drift from torchvision's after every training
    step. Statistics are fp32 whatever the compute dtype (fp64 only for fp64 inputs under
    `jax_enable_x64`). Batch statistics are plain means over the (global) batch, so under
    `jax.jit` with a batch-sharded input XLA reduces them across devices: synchronised BatchNorm
    without an axis name.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        # The attribute `nnx.Module.train()` / `.eval()` toggle.
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = self._batch_stats(x)
        scale = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        shift = self.bias[...] - mean * scale
        # fp32 affine: x - mean cancels badly in bf16 when |mean| >> std.
        return (at_least_fp32(x) * scale + shift).astype(x.dtype)

    def _batch_stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        axes = tuple(range(x.ndim - 1))
        n = math.prod(x.shape[a] for a in axes)
        if n < 2:
            raise ValueError(
                f"BatchNorm in training mode needs more than 1 value per channel, got {x.shape}"
            )
        x32 = at_least_fp32(x)
        mean = x32.mean(axes)
        var = jnp.square(x32 - mean).mean(
            axes
        )  # two-pass, as PyTorch: no E[x^2]-E[x]^2 cancellation
        m = self.momentum
        unbiased = jax.lax.stop_gradient(var) * (n / (n - 1))
        self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
        self.var[...] = m * self.var[...] + (1 - m) * unbiased
        return mean, var

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view(model, use_running_average=...)`."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class Sequential(nnx.List):
    """`torch.nn.Sequential`: children indexed 0, 1, ... so paths keep torchvision's indices."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


def conv(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, groups: int = 1, dtype, rngs: nnx.Rngs
) -> nnx.Conv:
    """Bias-free conv with PyTorch's symmetric padding (k - 1) // 2; Flax "SAME" pads stride-2
    convs asymmetrically and would shift every feature map by half a pixel."""
    pad = (kernel - 1) // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=CONV_INIT,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C] in fp32 (the features the losses see; fp64 for fp64 inputs)."""
    return at_least_fp32(x).mean(axis=(1, 2))


def at_least_fp32(x: jax.Array) -> jax.Array:
    """bf16 -> fp32; fp64 stays fp64, so a float64 run (jax_enable_x64) is float64 throughout."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
