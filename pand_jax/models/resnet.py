"""torchvision's ResNet-18 in Flax NNX (NHWC), numerically the same network.

Every parameter path is the torchvision state-dict key with Flax leaf names
(`layer1.0.conv1.weight` -> `layer1[0].conv1.kernel`, `bn1.running_var` -> `bn1.var`), so the
converter is a rename plus a layout transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pand_jax.models.conv import max_pool
from pand_jax.models.layers import BatchNorm, Sequential, conv, global_avg_pool


class BasicBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, out_ch, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(out_ch)
        self.downsample = (
            Sequential([conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs), BatchNorm(out_ch)])
            if stride != 1 or in_ch != out_ch
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


# (channels, stride of the first block) per stage; two BasicBlocks each.
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


class ResNet18(nnx.Module):
    """Backbone up to the global average pool; `__call__` returns [B, 512] fp32 features,
    `feature_map` the last stage's [B, H/32, W/32, 512] map before the pool."""

    num_features = 512

    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.conv1 = conv(3, 64, 7, 2, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(64)
        in_ch = 64
        for i, (ch, stride) in enumerate(RESNET18_STAGES, start=1):
            blocks = [
                BasicBlock(in_ch, ch, stride, dtype=dtype, rngs=rngs),
                BasicBlock(ch, ch, 1, dtype=dtype, rngs=rngs),
            ]
            setattr(self, f"layer{i}", Sequential(blocks))
            in_ch = ch

    def feature_map(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        # PyTorch's MaxPool2d(3, 2, padding=1): the padding never wins (-inf).
        x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return global_avg_pool(self.feature_map(x))
