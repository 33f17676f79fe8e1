"""The CLIP teacher: an open_clip CLIP (`convnext_xxlarge` by default, or a ViT) as an NNX module.

Configs are frozen dataclasses that round-trip through JSON (`to_dict` / `from_dict`); each tower's
config lives beside its module, and the vision config's `family` entry in the JSON ("convnext" or
"vit") says which image tower it is. `pand_jax.convert.open_clip.config_from_open_clip` reads one
from an open_clip model config.
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
from pand_jax.data import augment
from pand_jax.models import vit
from pand_jax.models.convnext import ConvNeXt, ConvNeXtConfig
from pand_jax.models.text import TextConfig, TextTransformer

TEACHER_MODEL = "convnext_xxlarge"
TEACHER_PRETRAINED = "laion2b_s34b_b82k_augreg_soup"
CONVERT_HINT = "Create them with `python convert_weights.py`."

# family -> (vision config, image tower). Configs saved before ViT towers existed have no family
# and are ConvNeXt ones.
VISION_TOWERS = {
    "convnext": (ConvNeXtConfig, ConvNeXt),
    "vit": (vit.ViTConfig, vit.VisionTransformer),
}
DEFAULT_FAMILY = "convnext"
# The ConvNeXt stem (/4) and its three downsamples (/2) leave nothing of a smaller image.
CONVNEXT_MIN_SIZE = 32


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: ConvNeXtConfig | vit.ViTConfig
    text: TextConfig

    @property
    def family(self) -> str:
        return next(f for f, (c, _) in VISION_TOWERS.items() if isinstance(self.vision, c))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vision"]["family"] = self.family
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        v = dict(d["vision"])
        family = v.pop("family", DEFAULT_FAMILY)
        if family not in VISION_TOWERS:
            raise ValueError(
                f"unknown image tower family {family!r} in a CLIP config; expected "
                f"one of {sorted(VISION_TOWERS)}"
            )
        v = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}  # JSON lists
        return cls(d["embed_dim"], VISION_TOWERS[family][0](**v), TextConfig(**d["text"]))


class CLIP(nnx.Module):
    """open_clip CLIP with a ConvNeXt or ViT image tower. Features come back unnormalised,
    float32."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        tower = VISION_TOWERS[config.family][1]
        self.visual = tower(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)
        self.text = TextTransformer(config.text, config.embed_dim, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))  # a log

    def encode_image(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised float images of a size `check_image_size` accepts ->
        [B, embed_dim]."""
        return self.visual(images)

    def check_image_size(self, size: int, name: str = "image size") -> None:
        """Raises a one-line ValueError (naming `size` as `name`, e.g. a config key) unless the
        image tower takes `size` x `size` images: a ViT its own size only (a fixed
        positional-embedding grid), a ConvNeXt at least 32 px."""
        if self.config.family == "vit":
            vit.check_image_size(self.config.vision, size, name)
        elif size < CONVNEXT_MIN_SIZE:
            raise ValueError(
                f"{name} {size} px is too small for the ConvNeXt image tower: it "
                f"takes at least {CONVNEXT_MIN_SIZE} px"
            )

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int tokens (EOT = the largest id in each row) -> [B, embed_dim]."""
        return self.text(tokens)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int tokens -> [B, L, width] token embeddings, without positional embedding."""
        return self.text.embed_tokens(tokens)

    def encode_text_embeds(self, token_embeddings: jax.Array, eot_index: jax.Array) -> jax.Array:
        """[B, L, width] input embeddings, [B] EOT positions -> [B, embed_dim]. L may be cut
        short."""
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


def check_preprocessing(preprocess: dict[str, Any], what: str) -> None:
    """Refuses, in one line, a CLIP whose preprocessing mean/std (the `preprocess` entry
    `convert_weights.py` records from open_clip) is not the one pand_jax normalises every image
    with: student and teacher share one normalised view. Weights recorded without them (the
    demo, older conversions) used OpenAI's, which is pand_jax's."""
    for key, ours in (("mean", augment.CLIP_MEAN), ("std", augment.CLIP_STD)):
        theirs = preprocess.get(key)
        if theirs is not None and not np.allclose(theirs, ours, rtol=0, atol=1e-6):
            raise ValueError(
                f"{what} was trained on images normalised with {key} {tuple(theirs)}; pand_jax "
                f"normalises with OpenAI's {key} ({', '.join(map(str, ours))}) for teacher and "
                "student alike: use a CLIP trained with OpenAI's mean/std"
            )


def load_clip(path: str | pathlib.Path = "weights/teacher", dtype=jnp.float32) -> CLIP:
    """The CLIP saved by `save_clip` / `convert_weights.py`, computing in `dtype`."""
    # Checked before load_module: errors raised under its eval_shape trace gain JAX's traceback
    # note and would no longer be one line.
    meta = weights.read_meta(path, "clip", hint=CONVERT_HINT)
    check_preprocessing(meta.get("preprocess", {}), f"the CLIP in {path}")
    config = CLIPConfig.from_dict(meta["config"])
    model, _ = weights.load_module(
        path, lambda _: CLIP(config, dtype=dtype, rngs=nnx.Rngs(0)), kind="clip", hint=CONVERT_HINT
    )
    return model
