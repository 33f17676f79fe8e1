"""CoOp prompt learning (Stage-PSC): 16 shared context vectors replace the embeddings of 16
placeholder tokens in `[SOS] X X ... X <template with class name> [EOS]`; the frozen text tower
turns each class prompt into a text anchor.

The text tower is causal, so the EOT feature depends only on the tokens up to EOT: every prompt
is cut just after the longest prompt's EOT, which gives identical features for less work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pand_jax import devices, losses

PLACEHOLDER = "X"


class PromptParts(NamedTuple):
    """Frozen pieces of the class prompts around the learned context."""

    prefix: jax.Array  # [C, 1, W]  SOS embedding
    suffix: jax.Array  # [C, L - 1 - n_ctx, W]  class text, EOS, padding up to the cut
    eot_index: jax.Array  # [C]


def tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
    """open_clip's BPE tokenizer (lower-cased, SOS/EOS, cut to context_length with EOT kept)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokens = SimpleTokenizer(context_length=context_length)(list(texts))
    return np.asarray(tokens, dtype=np.int32)


def cut_after_eot(tokens: np.ndarray) -> np.ndarray:
    """Drops the padding columns after the longest sequence's EOT (the largest token id)."""
    return tokens[:, : int(tokens.argmax(-1).max()) + 1]


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
    return [template.format(name) for name in class_names]


def context_prompts(class_names: Sequence[str], template: str, n_ctx: int) -> list[str]:
    placeholders = " ".join([PLACEHOLDER] * n_ctx)
    return [f"{placeholders} {text}" for text in class_prompts(class_names, template)]


def prompt_parts(clip, class_names: Sequence[str], template: str, n_ctx: int) -> PromptParts:
    tokens = cut_after_eot(
        tokenize(context_prompts(class_names, template, n_ctx), clip.config.text.context_length)
    )
    if tokens.shape[1] >= clip.config.text.context_length and n_ctx:
        longest = max(class_names, key=len)
        raise ValueError(
            f"the prompt for {longest!r} with {n_ctx} context tokens does not fit in "
            f"{clip.config.text.context_length} tokens; lower n_ctx"
        )
    embeds = clip.embed_tokens(jnp.asarray(tokens))
    return PromptParts(
        prefix=embeds[:, :1],
        suffix=embeds[:, 1 + n_ctx :],
        eot_index=jnp.asarray(tokens.argmax(-1)),
    )


def word_context(clip, words: str) -> jax.Array:
    """[n, W] the token embeddings of `words` (n tokens): a context that starts as those words,
    as CoOp's and FDBPL's ctx_init does."""
    tokens = tokenize([words], clip.config.text.context_length)[0]
    return clip.embed_tokens(jnp.asarray(tokens[1 : int(tokens.argmax())]))


def init_context(key: jax.Array, n_ctx: int, width: int, std: float = 0.02) -> jax.Array:
    return std * jax.random.normal(key, (n_ctx, width), jnp.float32)


def prompt_features(clip, ctx: jax.Array, parts: PromptParts) -> jax.Array:
    """Unnormalised text features [C, D] of the prompts with context `ctx` [n_ctx, W]."""
    num_classes = parts.prefix.shape[0]
    ctx = jnp.broadcast_to(ctx.astype(parts.prefix.dtype), (num_classes, *ctx.shape))
    embeds = jnp.concatenate([parts.prefix, ctx, parts.suffix], axis=1)
    return clip.encode_text_embeds(embeds, parts.eot_index)


def template_anchors(clip, class_names: Sequence[str], template: str) -> np.ndarray:
    """Hand-crafted text anchors (VL2Lite and the "+NSD only" ablation): L2-normalised
    features of `template.format(name)` from the frozen text tower, [C, D]."""
    tokens = cut_after_eot(
        tokenize(class_prompts(class_names, template), clip.config.text.context_length)
    )
    encode = devices.jit_apply(clip, lambda m, t: losses.l2_normalize(m.encode_text(t)))
    return np.asarray(encode(jnp.asarray(tokens)))
