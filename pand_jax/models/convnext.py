"""timm ConvNeXt (linear-MLP blocks) with open_clip's CLIP head, NHWC.

Attribute names follow timm/open_clip (`stem_conv` = `trunk.stem.0`, `conv_dw`, `mlp_fc1`, `gamma`,
`head_norm` = `trunk.head.norm`, `head_proj` = `head.proj`) so that the converter in
`pand_jax.convert.open_clip` is a plain key-by-key map.

Precision: parameters are float32; convolutions and matmuls run in `dtype`; LayerNorm statistics,
the residual stream and the pooled output stay float32 (40 bf16 residual adds would drift).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pand_jax.models.conv import conv_general_dilated
from pand_jax.models.layers import gelu, layer_norm

# timm ConvNeXt variants with linear-MLP blocks: (depths, dims, LayerNorm eps). timm uses eps 1e-6
# except for convnext_xxlarge (1e-5).
TIMM_CONVNEXT = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), 1e-6),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), 1e-6),
    "convnext_xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
}


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple
    dims: tuple
    image_size: int
    ln_eps: float
    timm_model_name: str = ""
    proj: str = "linear"  # open_clip `timm_proj`: "linear" or "mlp"
    proj_bias: bool = False


class Block(nnx.Module):
    """dwconv7 -> LN -> Linear 4x -> GELU -> Linear -> gamma -> + residual."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.conv_dw = nnx.Conv(
            dim,
            dim,
            (7, 7),
            padding=((3, 3), (3, 3)),
            feature_group_count=dim,
            dtype=dtype,
            conv_general_dilated=conv_general_dilated,
            rngs=rngs,
        )
        self.norm = layer_norm(dim, eps, dtype, rngs)
        self.mlp_fc1 = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.mlp_fc2 = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        # Layer scale is a parameter of its own (timm inits it to 1e-6; converted weights set it).
        self.gamma = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv_dw(x.astype(self.dtype))
        y = self.mlp_fc2(gelu(self.mlp_fc1(self.norm(y))))
        return x + y.astype(jnp.float32) * self.gamma[...]


class Stage(nnx.Module):
    """Optional downsample (LN + conv 2x2 stride 2), then `depth` blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        eps: float,
        *,
        downsample: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.downsample_norm = layer_norm(in_dim, eps, dtype, rngs) if downsample else None
        self.downsample_conv = (
            nnx.Conv(
                in_dim,
                dim,
                (2, 2),
                strides=2,
                padding="VALID",
                dtype=dtype,
                conv_general_dilated=conv_general_dilated,
                rngs=rngs,
            )
            if downsample
            else None
        )
        self.blocks = nnx.List([Block(dim, eps, dtype=dtype, rngs=rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample_conv is not None:
            x = self.downsample_conv(self.downsample_norm(x)).astype(jnp.float32)
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXt(nnx.Module):
    """open_clip `TimmModel` around a timm ConvNeXt: trunk, avg pool, LN, projection head."""

    def __init__(self, cfg: ConvNeXtConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        eps, dims = cfg.ln_eps, cfg.dims
        self.stem_conv = nnx.Conv(
            3,
            dims[0],
            (4, 4),
            strides=4,
            padding="VALID",
            dtype=dtype,
            conv_general_dilated=conv_general_dilated,
            rngs=rngs,
        )
        self.stem_norm = layer_norm(dims[0], eps, jnp.float32, rngs)  # starts the fp32 residual
        in_dims = (dims[0],) + tuple(dims[:-1])
        self.stages = nnx.List(
            [
                Stage(i, d, n, eps, downsample=k > 0, dtype=dtype, rngs=rngs)
                for k, (i, d, n) in enumerate(zip(in_dims, dims, cfg.depths))
            ]
        )
        self.head_norm = layer_norm(dims[-1], eps, dtype, rngs)
        if cfg.proj == "linear":
            self.head_proj = nnx.Linear(
                dims[-1], embed_dim, use_bias=cfg.proj_bias, dtype=dtype, rngs=rngs
            )
        else:  # "mlp": timm Mlp(C, 2 * embed_dim, embed_dim), as in open_clip's convnext_large_d
            self.head_mlp_fc1 = nnx.Linear(dims[-1], 2 * embed_dim, dtype=dtype, rngs=rngs)
            self.head_mlp_fc2 = nnx.Linear(
                2 * embed_dim, embed_dim, use_bias=cfg.proj_bias, dtype=dtype, rngs=rngs
            )
        self.proj = cfg.proj

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] (H, W divisible by 32) -> [B, embed_dim] float32."""
        if min(images.shape[1:3]) < 32:  # stem /4 and three /2 downsamples leave nothing
            raise ValueError(
                f"the ConvNeXt image tower needs images of at least 32 x 32 "
                f"pixels, got {images.shape[1]} x {images.shape[2]}"
            )
        x = self.stem_norm(self.stem_conv(images))
        for stage in self.stages:
            x = stage(x)
        x = self.head_norm(jnp.mean(x, axis=(1, 2)))
        if self.proj == "linear":
            x = self.head_proj(x)
        else:
            x = self.head_mlp_fc2(gelu(self.head_mlp_fc1(x)))
        return x.astype(jnp.float32)
