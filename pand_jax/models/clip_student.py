"""A CLIP image tower as the student (`--student clip:DIR`, DIR a converted open_clip ViT CLIP),
trained through VPT-deep visual prompts as PromptKD and PromptSRC train theirs.

    CLIPStudent(vision, embed_dim, num_classes, prompt_tokens=n, prompt_depth=D, ...)
      .visual      the ViT image tower (`models.vit.VisionTransformer`)
      .prompts     [D, n, width] learnable tokens, inserted at each of the first D layers
      .classifier  cosine similarity to the class text features times CLIP's logit scale
                   (`heads.CosineClassifier`), or PromptKD's anchor head (`head_dim`)
      .text_context  optional CoOp context on DIR's text tower (`TextContext`, `.text`)
      .encode(x) -> (patch-token map [B, g, g, width], embedding [B, embed_dim])

It has the CNN `Student`'s interface (features, feature_map, __call__, num_features), so every
method of `pand_jax.methods` trains it. `frozen` names the parts the optimiser leaves alone: the
text tower always, the image tower unless `train` is "all". The class vectors are DIR's own
text features of the run's prompt template, computed once and frozen, or with a text context
computed from it every step; `folded` computes them once for the saved, exported student.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from pand_jax import losses
from pand_jax.config import CLIP_STUDENT as PREFIX  # --student clip:DIR
from pand_jax.models import heads, vit
from pand_jax.models.text import TextConfig, TextTransformer

ARCH = "clip"
TRAIN = ("prompts", "all")  # `student_train`: what of a CLIP student trains
# PromptSRC's and PromptKD's normal init of the visual prompts, and CoOp's of a text context.
PROMPT_INIT_STD = 0.02


def is_clip(student: str) -> bool:
    return student.startswith(PREFIX)


def clip_dir(student: str) -> str:
    """DIR of `clip:DIR`."""
    return student[len(PREFIX) :]


class TextContext(nnx.Module):
    """CoOp on a CLIP student's own frozen text tower: n learned context vectors replace the
    placeholders of `[SOS] X .. X <template with class name> [EOS]`, and the class vectors are
    s L2norm(text(prompt_c))^T [D, C]. The prompts' fixed embeddings around the context and the
    scale s are frozen, like the class vectors they stand for."""

    def __init__(
        self,
        prefix: jax.Array,
        suffix: jax.Array,
        eot_index: jax.Array,
        *,
        scale: float,
        context: jax.Array,
    ):
        self.prefix = heads.ClassVectors(prefix)  # [C, 1, W] the SOS embedding
        self.suffix = heads.ClassVectors(suffix)  # [C, L - 1 - n, W] class text, EOS, ...
        self.eot_index = heads.ClassVectors(eot_index)  # [C]
        self.scale = heads.ClassVectors(jnp.asarray(scale, jnp.float32))
        self.context = nnx.Param(context)  # [n, W]

    def class_vectors(self, text: TextTransformer) -> jax.Array:
        ctx = self.context[...]
        ctx = jnp.broadcast_to(ctx, (self.prefix.shape[0], *ctx.shape))
        embeds = jnp.concatenate([self.prefix[...], ctx, self.suffix[...]], axis=1)
        features = text.encode_embeds(embeds, self.eot_index[...])
        return self.scale[...] * losses.l2_normalize(features).T


class CLIPStudent(nnx.Module):
    arch = ARCH

    def __init__(
        self,
        vision: vit.ViTConfig,
        embed_dim: int,
        num_classes: int,
        *,
        prompt_tokens: int,
        prompt_depth: int,
        train: str = "prompts",
        head_dim: int | None = None,
        text: TextConfig | None = None,
        text_context: TextContext | None = None,
        negative_context: TextContext | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_prompts(vision, prompt_depth)
        if train not in TRAIN:
            raise ValueError(f"student_train = {train!r}: expected one of {list(TRAIN)}")
        self.vision = vision
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.head_dim = head_dim
        self.prompt_tokens, self.prompt_depth, self.train_mode = prompt_tokens, prompt_depth, train
        self.visual = vit.VisionTransformer(vision, embed_dim, dtype=dtype, rngs=rngs)
        self.prompts = nnx.Param(
            PROMPT_INIT_STD
            * jax.random.normal(
                rngs.params(), (prompt_depth, prompt_tokens, vision.width), jnp.float32
            )
        )
        self.num_features = embed_dim
        self.classifier = (
            heads.CosineClassifier(embed_dim, num_classes)
            if head_dim is None
            else heads.AnchorClassifier(embed_dim, head_dim, num_classes, rngs=rngs)
        )
        # With a learned text context, the text tower (frozen) computes the class vectors.
        self.text = (
            None
            if text_context is None
            else TextTransformer(text, embed_dim, dtype=dtype, rngs=rngs)
        )
        self.text_context = text_context
        self.negative_context = negative_context  # FDBPL's negative prompts (training only)

    @property
    def frozen(self) -> tuple[str, ...]:
        """Submodules that do not train (`student.trainable`)."""
        return ("visual", "text") if self.train_mode == "prompts" else ("text",)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the patch tokens after ln_post as a map [B, g, g, width], the image embedding
        [B, embed_dim]), both float32."""
        tokens = self.visual.tokens(x, self.prompts[...])
        g = self.vision.grid
        patches = self.visual.ln_post(tokens[:, 1 : 1 + g * g])
        return (rearrange(patches, "b (h w) c -> b h w c", h=g, w=g), self.visual.head(tokens))

    def feature_map(self, x: jax.Array) -> jax.Array:
        return self.encode(x)[0]

    def features(self, x: jax.Array) -> jax.Array:
        return self.visual(x, self.prompts[...])

    def class_vectors(self) -> jax.Array | None:
        """s t_hat^T [D, C] from the learned text context; None: the classifier's stored ones."""
        return None if self.text_context is None else self.text_context.class_vectors(self.text)

    def logits(self, h: jax.Array) -> jax.Array:
        """z of the image embeddings h: cosine to the class vectors times the scale."""
        return self.classifier(h, self.class_vectors())

    def negative(self, h: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]] | None:
        """With a negative context (FDBPL): (z- of the embeddings h, (t+, t-) the normalised
        class text features [C, D] of both contexts); None without one."""
        if self.negative_context is None:
            return None
        positive, negative = self.class_vectors(), self.negative_context.class_vectors(self.text)
        return (
            self.classifier(h, negative),
            (losses.l2_normalize(positive.T), losses.l2_normalize(negative.T)),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.logits(self.features(x))

    def folded(self) -> CLIPStudent:
        """The student to save and export: the text context's class vectors computed once into
        the classifier, the text tower dropped (itself when it has none)."""
        if self.text_context is None:
            return self
        out = nnx.eval_shape(
            lambda: CLIPStudent(
                self.vision,
                self.embed_dim,
                self.num_classes,
                prompt_tokens=self.prompt_tokens,
                prompt_depth=self.prompt_depth,
                train=self.train_mode,
                rngs=nnx.Rngs(0),
            )
        )
        state = nnx.state(out)
        state["visual"] = nnx.state(self.visual)
        state["prompts"] = nnx.state(self)["prompts"]
        nnx.update(out, state)
        out.classifier.classes = heads.ClassVectors(self.class_vectors())
        return out

    def config(self) -> dict[str, Any]:
        """What `build` rebuilds it from (the student's config.json)."""
        cfg = {
            "arch": ARCH,
            "num_classes": self.num_classes,
            "embed_dim": self.embed_dim,
            "vision": dataclasses.asdict(self.vision),
            "prompt_tokens": self.prompt_tokens,
            "prompt_depth": self.prompt_depth,
            "train": self.train_mode,
        }
        return cfg | ({"head_dim": self.head_dim} if self.head_dim is not None else {})


def build(cfg: dict[str, Any], dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> CLIPStudent:
    """The CLIPStudent of a saved student's config (`CLIPStudent.config`)."""
    return CLIPStudent(
        vit.ViTConfig(**cfg["vision"]),
        cfg["embed_dim"],
        cfg["num_classes"],
        prompt_tokens=cfg["prompt_tokens"],
        prompt_depth=cfg["prompt_depth"],
        train=cfg.get("train", "prompts"),
        head_dim=cfg.get("head_dim"),
        dtype=dtype,
        rngs=rngs or nnx.Rngs(0),
    )


def check_prompts(vision: vit.ViTConfig, depth: int) -> None:
    if not 1 <= depth <= vision.layers:
        raise ValueError(
            f"student_prompt_depth = {depth}: expected 1 .. {vision.layers}, the "
            f"layers of the CLIP student's image tower"
        )


def check_tower(clip, path: str | pathlib.Path, image_size: int) -> None:
    """One-line errors for a CLIP that cannot be a prompted student at `image_size`."""
    if clip.config.family != "vit":
        raise ValueError(
            f"--student clip:{path}: the CLIP there has a {clip.config.family} image "
            "tower; a CLIP student needs a ViT one (its visual prompts are tokens)"
        )
    vit.check_image_size(clip.config.vision, image_size, "image_size")


def from_clip(
    clip,
    num_classes: int,
    class_features: jax.Array | None,
    *,
    prompt_tokens: int,
    prompt_depth: int,
    train: str,
    head_dim: int | None,
    dtype,
    rngs: nnx.Rngs,
    text_prompts=None,
    negative_prompts=None,
) -> CLIPStudent:
    """A CLIPStudent holding `clip`'s image tower, in train mode. Its class vectors: the text
    features `class_features` [C, D] times the CLIP's logit scale; or with `text_prompts`
    (prefix [C, 1, W], suffix [C, L', W] and EOT index [C] of CoOp prompts with n placeholders,
    `prompts.prompt_parts`, and the initial context [n, W]) learned through `clip`'s text
    tower, `negative_prompts` likewise for a negative context beside it; or with `head_dim`
    (all None) an anchor head the method sets."""
    scale = float(jnp.exp(clip.logit_scale[...]))
    context, negative = (
        None if p is None else TextContext(*p[:3], scale=scale, context=p[3])
        for p in (text_prompts, negative_prompts)
    )
    model = CLIPStudent(
        clip.config.vision,
        clip.config.embed_dim,
        num_classes,
        prompt_tokens=prompt_tokens,
        prompt_depth=prompt_depth,
        train=train,
        head_dim=head_dim,
        text=clip.config.text,
        text_context=context,
        negative_context=negative,
        dtype=dtype,
        rngs=rngs,
    )
    nnx.update(model.visual, nnx.state(clip.visual))
    if context is not None:
        nnx.update(model.text, nnx.state(clip.text))
    elif class_features is not None:
        model.classifier.set_classes(class_features, scale)
    model.train()
    return model
