"""open_clip CLIP state dict (ConvNeXt or ViT image tower) -> `pand_jax.models.clip.CLIP`, and a
parity check.

The key map is explicit, one entry per PyTorch tensor, with the layout change it needs:
  "linear": Linear weight [out, in] -> kernel [in, out]
  "conv":   conv weight OIHW -> HWIO (a depthwise [C, 1, 7, 7] becomes [7, 7, 1, C])
  "copy":   same layout (biases, LayerNorm weight -> scale, gamma, embeddings, projections)
The expected PyTorch shapes are derived from the NNX model's own shapes through the same map,
so a checkpoint of another architecture (its first tensor of another shape, in model order) and
any missing or unexpected key are named before anything is copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pand_jax.convert.state_dict import (
    ConversionError,
    check_state_dict,
    nchw,
    relative_diff,
    to_flax_layout,
    torch_shape,
)
from pand_jax.data import augment
from pand_jax.models import clip as clip_lib
from pand_jax.models.clip import CLIP, CLIPConfig
from pand_jax.models.convnext import TIMM_CONVNEXT, ConvNeXtConfig
from pand_jax.models.text import TextConfig
from pand_jax.models.vit import ViTConfig

# Tiny ConvNeXt variants for offline demos and tests (depths, dims, LayerNorm eps), registered
# with timm by `register_demo_models`, and their open_clip model configs (64 px, 2-layer text
# tower, small vocabulary).
DEMO_CONVNEXT = {
    "pand_demo_convnext": ((1, 1, 2, 1), (16, 32, 48, 64), 1e-6),
    "pand_demo_convnext_eps5": ((2, 1, 1, 1), (24, 32, 40, 56), 1e-5),
}
_CONVNEXT_VARIANTS = {**TIMM_CONVNEXT, **DEMO_CONVNEXT}

DEMO_MODELS = {
    "pand_demo_convnext": {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "pand_demo_convnext",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "timm_drop": 0.0,
            "timm_drop_path": 0.1,
            "image_size": 64,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 4, "layers": 2},
    },
    "pand_demo_convnext_eps5": {
        "embed_dim": 24,
        "vision_cfg": {
            "timm_model_name": "pand_demo_convnext_eps5",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "timm_drop": 0.0,
            "timm_drop_path": 0.1,
            "image_size": 64,
        },
        "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 48, "heads": 3, "layers": 2},
    },
    # Tiny ViTs (32 px, 8 px patches: a 4 x 4 grid), one per activation, widths and head counts
    # unlike each other's so that no swapped dimension goes unnoticed.
    "pand_demo_vit": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 48,
            "head_width": 16,
            "layers": 2,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 4, "layers": 2},
    },
    "pand_demo_vit_quickgelu": {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 48,
            "patch_size": 16,
            "width": 40,
            "head_width": 20,
            "layers": 3,
        },
        "text_cfg": {"context_length": 12, "vocab_size": 300, "width": 48, "heads": 3, "layers": 2},
    },
}

Entry = tuple[str, tuple, str]  # (PyTorch key, NNX state path, layout kind)

# Non-parameter buffers some open_clip versions save; nothing to convert.
IGNORED_SUFFIXES = ("attn_mask", "position_ids")


def supported_models() -> list[str]:
    """open_clip built-in model names this port can represent, plus the demo models."""
    names = list(DEMO_MODELS)
    try:
        import open_clip
    except ImportError:
        return [clip_lib.TEACHER_MODEL] + names
    names += [
        n for n in open_clip.list_models() if not _problems(open_clip.get_model_config(n) or {})
    ]
    return sorted(names)


def open_clip_model_config(name: str) -> dict[str, Any]:
    """open_clip's model-config dict for a built-in or demo model name."""
    if name in DEMO_MODELS:
        return DEMO_MODELS[name]
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip model {name!r}; supported CLIP models: "
            + ", ".join(supported_models())
        )
    return cfg


# open_clip options this port implements only at their default value (anything else changes the
# computation). patch_dropout and output_tokens change nothing at evaluation.
_VIT_DEFAULTS = (
    ("ls_init_value", None),
    ("attentional_pool", False),
    ("no_ln_pre", False),
    ("pos_embed_type", "learnable"),
    ("final_ln_after_pool", False),
    ("pool_type", "tok"),
    ("mlp_ratio", 4.0),
    ("act_kwargs", None),
    ("norm_kwargs", None),
    ("qk_norm", False),
    ("scaled_cosine_attn", False),
    ("scale_heads", False),
    ("scale_attn_inner", False),
    ("scale_attn", False),
    ("scale_fc", False),
)
_TEXT_DEFAULTS = (
    ("hf_model_name", None),
    ("no_causal_mask", False),
    ("embed_cls", False),
    ("proj_bias", False),
    ("pool_type", "argmax"),
    ("ls_init_value", None),
    ("proj_type", "linear"),
    ("mlp_ratio", 4.0),
    ("act_kwargs", None),
    ("norm_kwargs", None),
    ("final_ln_after_pool", False),
    ("qk_norm", False),
    ("scaled_cosine_attn", False),
    ("scale_heads", False),
    ("scale_attn_inner", False),
    ("scale_attn", False),
    ("scale_fc", False),
)


def _family(vision: dict[str, Any]) -> str | None:
    """ "convnext", "vit", or None for image towers this port lacks (ResNets, other timm ones)."""
    if "timm_model_name" in vision and vision["timm_model_name"]:
        return "convnext" if vision["timm_model_name"] in _CONVNEXT_VARIANTS else None
    return "vit" if isinstance(vision.get("layers", 12), int) else None


def _changed(cfg: dict[str, Any], defaults, where: str) -> list[str]:
    return [f"{where} {key}={cfg[key]!r}" for key, ok in defaults if cfg.get(key, ok) != ok]


def _problems(d: dict[str, Any]) -> list[str]:
    """What in an open_clip model config this port cannot compute (empty: supported)."""
    vision, text = d.get("vision_cfg", {}), d.get("text_cfg", {})
    family = _family(vision)
    problems = (
        []
        if family
        else [
            f"image tower {vision['timm_model_name']!r} is not a timm ConvNeXt with linear MLPs"
            if vision.get("timm_model_name")
            else "image tower is neither a ViT nor a timm ConvNeXt"
        ]
    )
    if family == "convnext":
        if vision.get("timm_pool", "avg") not in ("", "avg"):
            problems.append(f"timm_pool {vision['timm_pool']!r}")
        if vision.get("timm_proj", "linear") not in ("linear", "mlp"):
            problems.append(f"timm_proj {vision['timm_proj']!r}")
    if family == "vit":
        problems += _changed(vision, _VIT_DEFAULTS, "vision_cfg")
        size, patch = _square(vision.get("image_size", 224)), _square(vision.get("patch_size", 16))
        if None in (size, patch) or size % patch:
            problems.append(
                f"vision_cfg image_size {vision.get('image_size')!r} is not a square "
                f"multiple of patch_size {vision.get('patch_size')!r}"
            )
        if vision.get("width", 768) % vision.get("head_width", 64):
            problems.append("vision_cfg width is not a multiple of head_width")
    problems += _changed(text, _TEXT_DEFAULTS, "text_cfg")
    for cfg, where in ((vision, "vision_cfg"), (text, "text_cfg")):
        if cfg.get("block_type") not in (None, "default"):
            problems.append(f"{where} block_type={cfg['block_type']!r}")
    for key in ("custom_text", "init_logit_bias", "multimodal_cfg"):
        if d.get(key):
            problems.append(key)
    return problems


def _square(size) -> int | None:
    """An open_clip size (int or [h, w]) as one int, None when not square."""
    if isinstance(size, int):
        return size
    return size[0] if len(size) == 2 and size[0] == size[1] else None


def config_from_open_clip(name_or_dict: str | dict[str, Any]) -> CLIPConfig:
    """CLIPConfig of an open_clip model: a built-in name or a model-config JSON dict."""
    d = open_clip_model_config(name_or_dict) if isinstance(name_or_dict, str) else name_or_dict
    label = name_or_dict if isinstance(name_or_dict, str) else "the given model config"
    problems = _problems(d)
    if problems:
        raise ValueError(
            f"{label} is not supported ({'; '.join(problems)}): only open_clip CLIP "
            "models with a ViT or timm ConvNeXt image tower and the standard text "
            "tower are. Supported: " + ", ".join(supported_models())
        )
    vision, text = d.get("vision_cfg", {}), d.get("text_cfg", {})
    # open_clip applies quick_gelu to both towers, except timm ones (ConvNeXt), which ignore it.
    quick = bool(d.get("quick_gelu", False))
    size = _square(vision.get("image_size", 224))
    if _family(vision) == "vit":
        width = vision.get("width", 768)
        tower = ViTConfig(
            width=width,
            layers=vision.get("layers", 12),
            heads=width // vision.get("head_width", 64),
            patch_size=_square(vision.get("patch_size", 16)),
            image_size=size,
            quick_gelu=quick,
        )
    else:
        timm_name = vision["timm_model_name"]
        depths, dims, eps = _CONVNEXT_VARIANTS[timm_name]
        tower = ConvNeXtConfig(
            depths,
            dims,
            size,
            eps,
            timm_name,
            vision.get("timm_proj", "linear"),
            vision.get("timm_proj_bias", False),
        )
    return CLIPConfig(
        embed_dim=d["embed_dim"],
        vision=tower,
        text=TextConfig(
            width=text.get("width", 512),
            heads=text.get("heads", 8),
            layers=text.get("layers", 12),
            context_length=text.get("context_length", 77),
            vocab_size=text.get("vocab_size", 49408),
            quick_gelu=quick,
        ),
    )


def preprocess_meta(name_or_dict: str | dict[str, Any], tag: str | None = None) -> dict[str, Any]:
    """The eval preprocessing open_clip uses for a model (and pretrained tag): mean, std,
    interpolation, resize_mode; recorded in the converted weights' metadata. Raises a
    ConversionError when the tag's weights were trained with another activation than the model
    config (open_clip only warns; the features would be off by ~1e-2)."""
    d = open_clip_model_config(name_or_dict) if isinstance(name_or_dict, str) else name_or_dict
    pre = {
        "mean": augment.CLIP_MEAN.tolist(),
        "std": augment.CLIP_STD.tolist(),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }  # open_clip's defaults
    pre.update({k: v for k, v in d.get("preprocess_cfg", {}).items() if k in pre})
    if tag is None:
        return pre
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name_or_dict, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name_or_dict)
        raise ConversionError(
            f"open_clip has no pretrained tag {tag!r} for {name_or_dict}; "
            + (f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags")
        )
    trained_quick, quick = bool(tag_cfg.get("quick_gelu")), bool(d.get("quick_gelu"))
    if trained_quick != quick and _family(d.get("vision_cfg", {})) == "vit":
        base = name_or_dict.removesuffix("-quickgelu")
        fix = f"{base}-quickgelu" if trained_quick else base
        raise ConversionError(
            f"{name_or_dict} / {tag} was trained with "
            f"{'QuickGELU' if trained_quick else 'exact GELU'}: convert it as "
            f"--model {fix}"
        )
    pre.update({k: list(v) if isinstance(v, tuple) else v for k, v in tag_cfg.items() if k in pre})
    return pre


def _ln(torch_prefix: str, path: tuple) -> Iterator[Entry]:
    yield f"{torch_prefix}.weight", path + ("scale",), "copy"
    yield f"{torch_prefix}.bias", path + ("bias",), "copy"


def _layer(torch_prefix: str, path: tuple, kind: str, bias: bool = True) -> Iterator[Entry]:
    yield f"{torch_prefix}.weight", path + ("kernel",), kind
    if bias:
        yield f"{torch_prefix}.bias", path + ("bias",), "copy"


def _block(torch_prefix: str, path: tuple) -> Iterator[Entry]:
    """open_clip's ResidualAttentionBlock (both towers)."""
    yield from _ln(f"{torch_prefix}.ln_1", path + ("ln_1",))
    # in_proj_weight is q;k;v stacked on dim 0, the same order the fused kernel splits in.
    yield f"{torch_prefix}.attn.in_proj_weight", path + ("attn", "in_proj", "kernel"), "linear"
    yield f"{torch_prefix}.attn.in_proj_bias", path + ("attn", "in_proj", "bias"), "copy"
    yield from _layer(f"{torch_prefix}.attn.out_proj", path + ("attn", "out_proj"), "linear")
    yield from _ln(f"{torch_prefix}.ln_2", path + ("ln_2",))
    yield from _layer(f"{torch_prefix}.mlp.c_fc", path + ("mlp_c_fc",), "linear")
    yield from _layer(f"{torch_prefix}.mlp.c_proj", path + ("mlp_c_proj",), "linear")


def vit_keys(vision: ViTConfig) -> Iterator[Entry]:
    """The ViT image tower's entries (also a CLIP student's, whose tower is `visual` too)."""
    v = ("visual",)
    yield from _layer("visual.conv1", v + ("conv1",), "conv", bias=False)
    yield "visual.class_embedding", v + ("class_embedding",), "copy"
    yield "visual.positional_embedding", v + ("positional_embedding",), "copy"
    yield from _ln("visual.ln_pre", v + ("ln_pre",))
    for i in range(vision.layers):
        yield from _block(f"visual.transformer.resblocks.{i}", v + ("resblocks", i))
    yield from _ln("visual.ln_post", v + ("ln_post",))
    yield "visual.proj", v + ("proj",), "copy"


def _convnext_keys(vision: ConvNeXtConfig) -> Iterator[Entry]:
    v, t = ("visual",), "visual.trunk"
    yield from _layer(f"{t}.stem.0", v + ("stem_conv",), "conv")
    yield from _ln(f"{t}.stem.1", v + ("stem_norm",))
    for s, depth in enumerate(vision.depths):
        sp = v + ("stages", s)
        if s > 0:
            yield from _ln(f"{t}.stages.{s}.downsample.0", sp + ("downsample_norm",))
            yield from _layer(f"{t}.stages.{s}.downsample.1", sp + ("downsample_conv",), "conv")
        for b in range(depth):
            bt, bp = f"{t}.stages.{s}.blocks.{b}", sp + ("blocks", b)
            yield f"{bt}.gamma", bp + ("gamma",), "copy"
            yield from _layer(f"{bt}.conv_dw", bp + ("conv_dw",), "conv")
            yield from _ln(f"{bt}.norm", bp + ("norm",))
            yield from _layer(f"{bt}.mlp.fc1", bp + ("mlp_fc1",), "linear")
            yield from _layer(f"{bt}.mlp.fc2", bp + ("mlp_fc2",), "linear")
    yield from _ln(f"{t}.head.norm", v + ("head_norm",))
    if vision.proj == "linear":
        yield from _layer("visual.head.proj", v + ("head_proj",), "linear", vision.proj_bias)
    else:
        yield from _layer("visual.head.mlp.fc1", v + ("head_mlp_fc1",), "linear")
        yield from _layer("visual.head.mlp.fc2", v + ("head_mlp_fc2",), "linear", vision.proj_bias)


def _text_keys(cfg: CLIPConfig) -> Iterator[Entry]:
    p = ("text",)
    yield "token_embedding.weight", p + ("token_embedding",), "copy"
    yield "positional_embedding", p + ("positional_embedding",), "copy"
    for i in range(cfg.text.layers):
        yield from _block(f"transformer.resblocks.{i}", p + ("resblocks", i))
    yield from _ln("ln_final", p + ("ln_final",))
    yield "text_projection", p + ("text_projection",), "copy"


def key_map(cfg: CLIPConfig) -> list[Entry]:
    vision = vit_keys if cfg.family == "vit" else _convnext_keys
    return [*vision(cfg.vision), *_text_keys(cfg), ("logit_scale", ("logit_scale",), "copy")]


def _get(tree: Mapping, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def expected_shapes(model: CLIP) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> shape of the open_clip state dict that fits `model` (abstract or not)."""
    pure = nnx.to_pure_dict(nnx.state(model))
    return {
        k: torch_shape(tuple(_get(pure, p).shape), kind) for k, p, kind in key_map(model.config)
    }


def check_architecture(
    sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], label: str
) -> None:
    """Raises a one-line ConversionError naming the first tensor (in the model's order) whose
    shape differs from what `label` expects: the sign of a checkpoint of another architecture."""
    bad = [k for k, want in expected.items() if k in sd and tuple(np.shape(sd[k])) != want]
    if bad:
        k = bad[0]
        raise ConversionError(
            f"the checkpoint is not a {label}: {k} is {tuple(np.shape(sd[k]))} in it but "
            f"{expected[k]} in {label} ({len(bad)} of {len(expected)} tensors differ); pass the "
            "--model (or --model-config) the checkpoint was trained with"
        )


def convert_state_dict(
    sd: Mapping[str, np.ndarray],
    cfg: CLIPConfig,
    dtype=jnp.float32,
    label: str = "model of this configuration",
) -> CLIP:
    """A CLIP holding the open_clip weights in `sd` (checked key by key and shape by shape;
    `label` names the model in the errors)."""
    abstract = nnx.eval_shape(lambda: CLIP(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    expected = expected_shapes(abstract)
    check_architecture(sd, expected, label)
    check_state_dict(sd, expected, ignore=IGNORED_SUFFIXES)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    entries = key_map(cfg)
    if len({p for _, p, _ in entries}) != len(jax.tree.leaves(pure)):
        raise AssertionError("key map does not cover every parameter")  # a bug here, not input
    for key, path, kind in entries:
        *parent, leaf = path
        # np.array, not np.ascontiguousarray: the latter turns the 0-d logit_scale into shape (1,).
        value = np.array(to_flax_layout(np.asarray(sd[key], np.float32), kind), order="C")
        if value.shape != _get(pure, path).shape:
            raise AssertionError(f"{key} converts to {value.shape}, not {_get(pure, path).shape}")
        _get(pure, tuple(parent))[leaf] = value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- PyTorch side


def register_demo_models() -> None:
    """Registers the tiny `pand_demo_*` ConvNeXts with timm so open_clip can build them."""
    import timm
    from timm.models import register_model
    from timm.models.convnext import _create_convnext

    for name, (depths, dims, eps) in DEMO_CONVNEXT.items():
        if timm.is_model(name):
            continue

        def entry(pretrained=False, _n=name, _a=(depths, dims, eps), **kw):
            # A stub pretrained config: without one timm logs a warning on every build.
            kw["pretrained_cfg"] = kw.get("pretrained_cfg") or {"architecture": _n}
            arch = dict(depths=_a[0], dims=_a[1], norm_eps=_a[2])
            return _create_convnext(_n, pretrained=pretrained, **{**arch, **kw})

        entry.__name__ = name  # timm registers under the function's name
        register_model(entry)


def build_torch_model(
    name_or_dict: str | dict[str, Any], device: str = "cpu", seed: int | None = None
):
    """The open_clip CLIP (PyTorch, eval mode) for a model name or config; device "meta" allocates
    nothing. `seed` fixes the default initialisation's random weights (otherwise torch's global
    generator draws them, whose state depends on everything that ran before in the process)."""
    import torch
    from open_clip.model import CLIP as TorchCLIP

    register_demo_models()
    cfg = open_clip_model_config(name_or_dict) if isinstance(name_or_dict, str) else name_or_dict
    with torch.random.fork_rng(devices=[]), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        model = TorchCLIP(**cfg)
    return model.eval()


def randomize_torch_model(model, seed: int = 0) -> None:
    """Makes the parameters the default init leaves constant (biases, LayerNorm affine, layer
    scale at 1e-6, logit_scale) random too, so no mistake can hide behind them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("gamma"):
                p.copy_(0.5 * noise)
            elif p.ndim <= 1:  # biases ~0 +- 0.3, LayerNorm weights ~1 +- 0.3, logit_scale
                p.add_(0.3 * noise if p.ndim else 0.1 * noise)


def random_inputs(cfg: CLIPConfig, batch: int, image_size: int, seed: int):
    """Normal images [B, S, S, 3] and token rows 'SOT, words, EOT, padding' with EOT = vocab-1."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    n, vocab = cfg.text.context_length, cfg.text.vocab_size
    tokens = np.zeros((batch, n), np.int64)
    for i, length in enumerate(rng.integers(2, n + 1, batch)):
        tokens[i, :length] = rng.integers(1, vocab - 1, length)
        tokens[i, length - 1] = vocab - 1
    return images, tokens


def verify_clip(
    model: CLIP, torch_model, *, batch: int = 4, image_size: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Runs the NNX model and the open_clip model on the same random images and tokens in float32
    (JAX matmul precision "highest") and returns {"image"|"text"|"logits": {"abs", "rel"}}."""
    import torch

    cfg = model.config
    images, tokens = random_inputs(cfg, batch, image_size or cfg.vision.image_size, seed)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        img, txt, logits = jax.jit(lambda s, x, t: _features(nnx.merge(graphdef, s), x, t))(
            state, images, tokens
        )
    torch_model = torch_model.float().eval()
    with torch.no_grad():
        ti = torch_model.encode_image(nchw(images))
        tt = torch_model.encode_text(torch.from_numpy(tokens))
        tl = torch_model.logit_scale.exp() * _normalize(ti) @ _normalize(tt).T
    return {
        name: dict(zip(("abs", "rel"), relative_diff(np.asarray(a), b.numpy())))
        for name, a, b in (("image", img, ti), ("text", txt, tt), ("logits", logits, tl))
    }


def _features(model: CLIP, images, tokens):
    return model.encode_image(images), model.encode_text(tokens), model(images, tokens)


def _normalize(x):
    return x / x.norm(dim=-1, keepdim=True)
