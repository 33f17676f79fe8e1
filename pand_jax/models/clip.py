"""The CLIP teacher: open_clip's ConvNeXt CLIP (`convnext_xxlarge` by default) as an NNX module.

Configs are frozen dataclasses that round-trip through JSON (`to_dict` / `from_dict`) and can be
read from any open_clip ConvNeXt model config (`config_from_open_clip`).
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
from pand_jax.models.convnext import ConvNeXt
from pand_jax.models.text import TextTransformer

# timm ConvNeXt variants with linear-MLP blocks: (depths, dims, LayerNorm eps). timm uses eps 1e-6
# except for convnext_xxlarge (1e-5). The `pand_demo_*` entries are tiny variants for offline demos
# and tests; `pand_jax.convert.open_clip.register_demo_models` registers them with timm.
TIMM_CONVNEXT = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 1e-6),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768), 1e-6),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024), 1e-6),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536), 1e-6),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048), 1e-6),
    "convnext_xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072), 1e-5),
    "pand_demo_convnext": ((1, 1, 2, 1), (16, 32, 48, 64), 1e-6),
    "pand_demo_convnext_eps5": ((2, 1, 1, 1), (24, 32, 40, 56), 1e-5),
}

# open_clip-format model configs of the demo models (64 px, 2-layer text tower, small vocab).
DEMO_MODELS = {
    "pand_demo_convnext": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "pand_demo_convnext", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0,
                       "timm_drop_path": 0.1, "image_size": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 4, "layers": 2},
    },
    "pand_demo_convnext_eps5": {
        "embed_dim": 24,
        "vision_cfg": {"timm_model_name": "pand_demo_convnext_eps5", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0,
                       "timm_drop_path": 0.1, "image_size": 64},
        "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 48, "heads": 3, "layers": 2},
    },
}

TEACHER_MODEL = "convnext_xxlarge"
TEACHER_PRETRAINED = "laion2b_s34b_b82k_augreg_soup"
CONVERT_HINT = "Create them with `python convert_weights.py`."


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple
    dims: tuple
    image_size: int
    ln_eps: float
    timm_model_name: str = ""
    proj: str = "linear"  # open_clip `timm_proj`: "linear" or "mlp"
    proj_bias: bool = False


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    ln_eps: float = 1e-5


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


def supported_models() -> list[str]:
    """open_clip built-in model names this port can represent, plus the demo models."""
    names = list(DEMO_MODELS)
    try:
        import open_clip
    except ImportError:
        return [TEACHER_MODEL] + names
    for name in open_clip.list_models():
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        if vision.get("timm_model_name") in TIMM_CONVNEXT:
            names.append(name)
    return sorted(names)


def open_clip_model_config(name: str) -> dict[str, Any]:
    """open_clip's model-config dict for a built-in or demo model name."""
    if name in DEMO_MODELS:
        return DEMO_MODELS[name]
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}; supported ConvNeXt CLIP models: "
                         + ", ".join(supported_models()))
    return cfg


def config_from_open_clip(name_or_dict: str | dict[str, Any]) -> CLIPConfig:
    """CLIPConfig of an open_clip model: a built-in name or a model-config JSON dict."""
    d = open_clip_model_config(name_or_dict) if isinstance(name_or_dict, str) else name_or_dict
    label = name_or_dict if isinstance(name_or_dict, str) else "the given model config"
    vision, text = d.get("vision_cfg", {}), d.get("text_cfg", {})
    timm_name = vision.get("timm_model_name")
    problems = []
    if timm_name not in TIMM_CONVNEXT:
        problems.append(f"image tower {timm_name!r} is not a timm ConvNeXt with linear MLPs"
                        if timm_name else "image tower is not a timm model")
    if vision.get("timm_pool", "avg") not in ("", "avg"):
        problems.append(f"timm_pool {vision['timm_pool']!r}")
    if vision.get("timm_proj", "linear") not in ("linear", "mlp"):
        problems.append(f"timm_proj {vision['timm_proj']!r}")
    for key, ok in (("hf_model_name", None), ("no_causal_mask", False), ("embed_cls", False),
                    ("proj_bias", False), ("pool_type", "argmax"), ("ls_init_value", None),
                    ("proj_type", "linear")):
        if text.get(key, ok) != ok:
            problems.append(f"text_cfg {key}={text[key]!r}")
    if d.get("quick_gelu"):
        problems.append("quick_gelu")
    if problems:
        raise ValueError(f"{label} is not supported ({'; '.join(problems)}): only open_clip CLIP "
                         "models with a timm ConvNeXt image tower and the standard text tower are. "
                         "Supported: " + ", ".join(supported_models()))
    depths, dims, eps = TIMM_CONVNEXT[timm_name]
    size = vision.get("image_size", 224)
    return CLIPConfig(
        embed_dim=d["embed_dim"],
        vision=ConvNeXtConfig(depths, dims, size if isinstance(size, int) else size[0], eps,
                              timm_name, vision.get("timm_proj", "linear"),
                              vision.get("timm_proj_bias", False)),
        text=TextConfig(width=text.get("width", 512), heads=text.get("heads", 8),
                        layers=text.get("layers", 12),
                        context_length=text.get("context_length", 77),
                        vocab_size=text.get("vocab_size", 49408)),
    )


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
