"""torchvision's MobileNet-V2 (width 1.0) in Flax NNX (NHWC), numerically the same network.

Parameter paths are torchvision's keys with Flax leaf names: `features.3.conv.1.0.weight` ->
`features[3].conv[1][0].kernel`. The ImageNet classifier (dropout + linear) is not part of the
backbone: `Student` adds a plain Linear, as the distillation code does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pand_jax.models.layers import BatchNorm, Sequential, conv, global_avg_pool

# (expand ratio t, output channels c, repeats n, first stride s), torchvision's table.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, groups: int = 1, dtype, rngs: nnx.Rngs
) -> Sequential:
    """torchvision's Conv2dNormActivation: indices 0 (conv), 1 (bn), 2 (ReLU6, no parameters)."""
    return Sequential(
        [
            conv(in_ch, out_ch, kernel, stride, groups=groups, dtype=dtype, rngs=rngs),
            BatchNorm(out_ch),
            jax.nn.relu6,
        ]
    )


class InvertedResidual(nnx.Module):
    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, *, dtype, rngs: nnx.Rngs
    ):
        hidden = in_ch * expand_ratio
        self.use_res_connect = stride == 1 and in_ch == out_ch
        # torchvision omits the 1x1 expansion when t == 1, which shifts the indices of `conv`.
        expand = (
            [conv_bn_relu6(in_ch, hidden, 1, dtype=dtype, rngs=rngs)] if expand_ratio != 1 else []
        )
        self.conv = Sequential(
            expand
            + [
                conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden, dtype=dtype, rngs=rngs),
                conv(hidden, out_ch, 1, dtype=dtype, rngs=rngs),  # linear bottleneck: no activation
                BatchNorm(out_ch),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2(nnx.Module):
    """Backbone up to the global average pool; `__call__` returns [B, 1280] fp32 features,
    `feature_map` the last [B, H/32, W/32, 1280] map before the pool."""

    num_features = LAST_CHANNELS

    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        layers = [conv_bn_relu6(3, STEM_CHANNELS, 3, 2, dtype=dtype, rngs=rngs)]
        in_ch = STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(
                    InvertedResidual(in_ch, c, s if i == 0 else 1, t, dtype=dtype, rngs=rngs)
                )
                in_ch = c
        layers.append(conv_bn_relu6(in_ch, LAST_CHANNELS, 1, dtype=dtype, rngs=rngs))
        self.features = Sequential(layers)

    def feature_map(self, x: jax.Array) -> jax.Array:
        return self.features(x.astype(self.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return global_avg_pool(self.feature_map(x))
