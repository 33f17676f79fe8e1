"""`python train.py --demo`: the whole PAND pipeline offline in a few minutes on a CPU.

A small ConvNeXt CLIP (or with `--demo-teacher vit` a small ViT CLIP; real BPE tokenizer and
vocabulary, tiny towers) is first taught the `digits` dataset with captions that differ from
the prompt template, so that it knows something but its zero-shot prompt is not perfect; then
Stage-PSC learns prompts on it and Stage-NSD distils it into a ResNet-18 trained from scratch.
Settings: configs/demo.json.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pand_jax import config as config_lib
from pand_jax import data as data_lib
from pand_jax import losses, prompts
from pand_jax.data import augment, datasets
from pand_jax.models.clip import CLIP, DEFAULT_FAMILY, CLIPConfig, save_clip
from pand_jax.progress import progress_bar

demo_config = config_lib.demo_config


def teacher_section(d: dict, family: str) -> dict:
    """The demo config's teacher section, with `teacher_variants[family]`'s keys replacing its
    own (the ConvNeXt teacher is the section as it stands)."""
    return {**d["teacher"], **(d["teacher_variants"][family] if family != DEFAULT_FAMILY else {})}


def teacher_dir(workdir: pathlib.Path, family: str) -> pathlib.Path:
    """Where the demo keeps its trained teacher: one folder per family, so that switching
    --demo-teacher never reuses the other family's teacher."""
    return workdir / ("teacher" if family == DEFAULT_FAMILY else f"teacher_{family}")


def teacher_config(t: dict) -> CLIPConfig:
    """The demo teacher's architecture: the `model` entry of the demo config's teacher section."""
    return CLIPConfig.from_dict(t["model"])


def _split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    source = data_lib.load_split("digits", split)
    examples = [source[i] for i in range(len(source))]
    return (
        np.stack([e["image"] for e in examples]),
        np.asarray([e["label"] for e in examples], np.int32),
    )


def train_teacher(t: dict, out: pathlib.Path) -> float:
    """Trains the demo CLIP contrastively on digits captions; saves it; returns the zero-shot
    top-1 of the prompt template on the test split."""
    info = datasets.get_dataset("digits")
    clip = CLIP(teacher_config(t), rngs=nnx.Rngs(t["seed"]))
    ctx_len = clip.config.text.context_length
    captions = [prompts.class_prompts(info.class_names, c) for c in t["captions"]]
    tokens = jnp.asarray(
        prompts.cut_after_eot(prompts.tokenize(sum(captions, []), ctx_len)).reshape(
            len(captions), info.num_classes, -1
        )
    )
    images, labels = _split_arrays(info.train_split)
    graphdef, params = nnx.split(clip)
    tx = optax.adamw(
        optax.cosine_decay_schedule(t["lr"], t["steps"]), weight_decay=t["weight_decay"]
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels, *, caption):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, copy=True)
            img = m.encode_image(augment.normalize(images))
            txt = m.encode_text(tokens[caption])
            return losses.coop_ce(img, txt, labels, jnp.exp(m.logit_scale[...]))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(t["seed"])
    bar = progress_bar(iterable=range(t["steps"]), desc="demo teacher", unit="step")
    for _ in bar:
        idx = rng.choice(len(labels), t["batch_size"], replace=False)
        params, opt_state, loss = step(
            params, opt_state, images[idx], labels[idx], caption=rng.integers(len(captions))
        )
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    clip = nnx.merge(graphdef, params)
    # The family is in the id, which keys the feature and teacher caches.
    family = "" if clip.config.family == DEFAULT_FAMILY else f"-{clip.config.family}"
    save_clip(
        out,
        clip,
        teacher_id=f"pand-demo-clip{family}:digits",
        model=f"pand_demo{family}",
        pretrained="digits",
    )
    test_images, test_labels = _split_arrays(info.test_split)
    anchors = prompts.template_anchors(clip, info.class_names, info.prompt_template)
    img = np.asarray(losses.l2_normalize(clip.encode_image(augment.normalize(test_images))))
    return float(np.mean(np.argmax(img @ anchors.T, -1) == test_labels))
