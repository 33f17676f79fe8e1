"""open_clip's CLIP text transformer: causal, pre-LN, exact GELU (QuickGELU for the
`-quickgelu` models), EOT pooling.

Names follow open_clip (`token_embedding`, `positional_embedding`, `resblocks[i].ln_1`,
`attn.in_proj` (q;k;v fused, as open_clip stores it), `attn.out_proj`, `mlp_c_fc`, `mlp_c_proj`,
`ln_final`, `text_projection`); the blocks are `layers.ResidualAttentionBlock`. Residual
stream and LayerNorm statistics stay float32; matmuls and attention run in `dtype`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pand_jax.models.layers import ResidualAttentionBlock, layer_norm


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    ln_eps: float = 1e-5
    quick_gelu: bool = False


class TextTransformer(nnx.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        w = cfg.width
        self.token_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, w))
        )
        self.positional_embedding = nnx.Param(
            0.01 * jax.random.normal(rngs.params(), (cfg.context_length, w))
        )
        self.resblocks = nnx.List(
            [
                ResidualAttentionBlock(
                    w,
                    cfg.heads,
                    cfg.ln_eps,
                    causal=True,
                    quick=cfg.quick_gelu,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(cfg.layers)
            ]
        )
        self.ln_final = layer_norm(w, cfg.ln_eps, jnp.float32, rngs)
        # Used as `x @ text_projection` (open_clip's layout, no transpose, no bias).
        self.text_projection = nnx.Param(w**-0.5 * jax.random.normal(rngs.params(), (w, embed_dim)))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int -> [B, L, width] float32 token embeddings (no positional embedding)."""
        return jnp.take(self.token_embedding[...], tokens, axis=0)

    def encode_embeds(self, token_embeddings: jax.Array, eot_index: jax.Array) -> jax.Array:
        """[B, L, width] embeddings (L <= context_length) and [B] EOT positions -> [B, embed_dim].

        The mask is causal, so the feature at `eot_index` does not depend on anything after it:
        a sequence cut after its last EOT gives the same result as the full context.
        """
        n = token_embeddings.shape[1]
        x = token_embeddings.astype(jnp.float32) + self.positional_embedding[:n]
        for block in self.resblocks:
            x = block(x)
        x = self.ln_final(x)
        x = jnp.take_along_axis(x, eot_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
        return jnp.matmul(x, self.text_projection[...])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        # EOT (49407) is the largest id in the vocabulary, so argmax finds it (open_clip's rule).
        return self.encode_embeds(self.embed_tokens(tokens), jnp.argmax(tokens, axis=-1))
