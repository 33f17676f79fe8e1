"""open_clip's ViT image tower (`VisionTransformer`, as in ViT-B-32 ... ViT-H-14), NHWC.

patch conv (`conv1`, no bias) -> class token + learned positional embedding -> `ln_pre` ->
bidirectional `layers.ResidualAttentionBlock`s -> `ln_post` on the class token -> `x @ proj`.
Names follow open_clip (`visual.transformer.resblocks.i` is `resblocks[i]`) so that the converter
in `pand_jax.convert.open_clip` is a plain key-by-key map. The positional embedding is a fixed
grid, so the tower takes its own image size only (open_clip does not interpolate either).

Precision as the text tower: parameters float32, matmuls and attention in `dtype`, the residual
stream, LayerNorm statistics and the projection in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from pand_jax.models.layers import ResidualAttentionBlock, layer_norm


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    ln_eps: float = 1e-5
    quick_gelu: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def check_image_size(cfg: ViTConfig, size: int, name: str = "image size") -> None:
    """Raises a one-line ValueError (naming `size` as `name`) unless `size` x `size` images fit
    the positional embedding."""
    if size != cfg.image_size:
        raise ValueError(
            f"{name} {size} px does not fit the ViT image tower: it takes {cfg.image_size} px "
            f"only (its positional embedding is a {cfg.grid} x {cfg.grid} grid of "
            f"{cfg.patch_size} px patches); set {name} to {cfg.image_size}"
        )


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: ViTConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        w, p = cfg.width, cfg.patch_size
        # Holds open_clip's patch conv (HWIO kernel); __call__ applies it as the matmul it is.
        self.conv1 = nnx.Conv(
            3, w, (p, p), strides=p, padding="VALID", use_bias=False, dtype=dtype, rngs=rngs
        )
        self.dtype = dtype
        scale = w**-0.5  # open_clip's init
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (w,)))
        self.positional_embedding = nnx.Param(
            scale * jax.random.normal(rngs.params(), (cfg.grid**2 + 1, w))
        )
        self.ln_pre = layer_norm(w, cfg.ln_eps, jnp.float32, rngs)  # starts the fp32 residual
        self.resblocks = nnx.List(
            [
                ResidualAttentionBlock(
                    w,
                    cfg.heads,
                    cfg.ln_eps,
                    causal=False,
                    quick=cfg.quick_gelu,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(cfg.layers)
            ]
        )
        self.ln_post = layer_norm(w, cfg.ln_eps, jnp.float32, rngs)
        # Used as `x @ proj` (open_clip's layout, no bias).
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (w, embed_dim)))
        self.config = cfg

    def patch_embed(self, images: jax.Array) -> jax.Array:
        """[B, S, S, 3] -> [B, grid^2, width] float32 (row-major patches, as open_clip's
        flatten). A conv whose kernel equals its stride is one matmul over the non-overlapping
        patches; written so, it compiles in a second where XLA:CPU takes ~15 s for a 32 x 32
        kernel, and runs as fast everywhere."""
        p = self.config.patch_size
        patches = rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        kernel = rearrange(self.conv1.kernel[...], "p q c o -> (p q c) o")
        return jnp.matmul(
            patches.astype(self.dtype),
            kernel.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def tokens(self, images: jax.Array, prompts: jax.Array | None = None) -> jax.Array:
        """images [B, S, S, 3] with S = config.image_size -> the residual stream after the last
        block, [B, 1 + grid^2 (+ n), width] float32: the class token, the patches, and with
        `prompts` [D, n, width] their n tokens last.

        `prompts` are VPT-deep visual prompts as PromptSRC and PromptKD insert them: prompts[0]
        is appended after the positional embedding (so ln_pre normalises it with the rest), and
        before each block i in 1 .. D-1 the n last tokens (the previous block's outputs at the
        prompts) are replaced by prompts[i]. From block D on they flow through unreplaced."""
        if images.shape[1] != images.shape[2]:
            raise ValueError(
                f"the ViT image tower takes square images, got "
                f"{images.shape[1]} x {images.shape[2]}"
            )
        check_image_size(self.config, images.shape[1])
        x = self.patch_embed(images)
        batch = x.shape[0]
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...]

        def prompt(i):
            return jnp.broadcast_to(prompts[i].astype(jnp.float32), (batch, *prompts.shape[1:]))

        if prompts is not None:
            x = jnp.concatenate([x, prompt(0)], axis=1)
        x = self.ln_pre(x)
        for i, block in enumerate(self.resblocks):
            if prompts is not None and 0 < i < prompts.shape[0]:
                x = jnp.concatenate([x[:, : -prompts.shape[1]], prompt(i)], axis=1)
            x = block(x)
        return x

    def head(self, tokens: jax.Array) -> jax.Array:
        """The embedding [B, embed_dim] of the residual stream `tokens` [B, L, width]. LayerNorm
        is per token, so normalising the class token alone equals open_clip's ln_post over all
        tokens followed by taking token 0."""
        return jnp.matmul(self.ln_post(tokens[:, 0]), self.proj[...])

    def __call__(self, images: jax.Array, prompts: jax.Array | None = None) -> jax.Array:
        """images [B, S, S, 3] with S = config.image_size -> [B, embed_dim] float32 (`tokens`
        says what `prompts` does)."""
        return self.head(self.tokens(images, prompts))
