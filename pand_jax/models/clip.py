"""The CLIP teacher: open_clip's ConvNeXt CLIP (`convnext_xxlarge` by default) as an NNX module.

Configs are frozen dataclasses that round-trip through JSON (`to_dict` / `from_dict`); each tower's
config lives beside its module. `pand_jax.convert.open_clip.config_from_open_clip` reads one from
any open_clip ConvNeXt model config.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pand_jax import weights
from pand_jax.models.convnext import ConvNeXt, ConvNeXtConfig
from pand_jax.models.text import TextConfig, TextTransformer

TEACHER_MODEL = "convnext_xxlarge"
TEACHER_PRETRAINED = "laion2b_s34b_b82k_augreg_soup"
CONVERT_HINT = "Create them with `python convert_weights.py`."


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: ConvNeXtConfig
    text: TextConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        v = dict(d["vision"], depths=tuple(d["vision"]["depths"]), dims=tuple(d["vision"]["dims"]))
        return cls(d["embed_dim"], ConvNeXtConfig(**v), TextConfig(**d["text"]))


class CLIP(nnx.Module):
    """open_clip CLIP with a ConvNeXt image tower. Features come back unnormalised, float32."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.visual = ConvNeXt(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)
        self.text = TextTransformer(config.text, config.embed_dim, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))  # a log

    def encode_image(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised float images, H and W divisible by 32 -> [B, embed_dim]."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int tokens (EOT = the largest id in each row) -> [B, embed_dim]."""
        return self.text(tokens)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int tokens -> [B, L, width] token embeddings, without positional embedding."""
        return self.text.embed_tokens(tokens)

    def encode_text_embeds(self, token_embeddings: jax.Array, eot_index: jax.Array) -> jax.Array:
        """[B, L, width] input embeddings, [B] EOT positions -> [B, embed_dim]. L may be cut short."""
        return self.text.encode_embeds(token_embeddings, eot_index)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """Image-text logits [B_img, B_txt] as open_clip computes them."""
        img, txt = self.encode_image(images), self.encode_text(tokens)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale[...]) * img @ txt.T


def save_clip(path: str | pathlib.Path, model: CLIP, /, **extra_meta) -> pathlib.Path:
    """Writes `model` with `pand_jax.weights` (kind "clip"); extra_meta: model name, tag, ..."""
    meta = {"kind": "clip", "config": model.config.to_dict(), **extra_meta}
    return weights.save_module(path, model, meta)


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_clip(path: str | pathlib.Path = "weights/teacher", dtype=jnp.float32) -> CLIP:
    """The CLIP saved by `save_clip` / `convert_weights.py`, computing in `dtype`."""
    model, _ = weights.load_module(
        path,
        lambda meta: CLIP(CLIPConfig.from_dict(meta["config"]), dtype=dtype, rngs=nnx.Rngs(0)),
        kind="clip",
        hint=CONVERT_HINT,
    )
    return model
