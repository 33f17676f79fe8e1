"""Stage-PSC: CoOp prompt learning on the frozen teacher, giving calibrated text anchors.

Teacher image features are computed once per split (eval transform, center crop of
`feature_image_size`: 256 for the paper's ConvNeXt, a ViT's own size for a ViT; L2-normalised)
and cached in the workdir; only the 16 context vectors are trained (optax SGD, cosine), with
the teacher's own logit scale; the text tower runs on prompts cut after the longest EOT. The
anchors of the epoch with the best selection score (the dataset's val split where it has one,
else test, as in the released code) are exported to `anchors.npz`, which Stage-NSD reads with
`--anchors`.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pand_jax import anchors as anchors_lib
from pand_jax import devices, losses, prompts
from pand_jax.data import augment, pipeline
from pand_jax.train import features, loop, setup

# How the teacher sees an image for its features: open_clip's evaluation preprocessing.
FEATURE_RESIZE = "shorter_center_crop"


def optimizer(cfg: dict[str, Any], total_steps: int) -> optax.GradientTransformation:
    """Paper: SGD 0.002, momentum 0.9, no weight decay; cosine to 0; optional clipping
    (the released code clips at 1.0)."""
    o = cfg["optimizer"]
    schedule = (
        optax.cosine_decay_schedule(o["lr"], total_steps)
        if o["schedule"] == "cosine"
        else optax.constant_schedule(o["lr"])
    )
    parts = [optax.clip_by_global_norm(o["grad_clip"])] if o["grad_clip"] else []
    if o["weight_decay"]:
        parts.append(optax.add_decayed_weights(o["weight_decay"]))
    parts.append(optax.sgd(schedule, momentum=o["momentum"]))
    return optax.chain(*parts)


def anchors_fn(graphdef):
    """`anchors_of(ctx, (teacher_state, parts))`: L2-normalised prompt features [C, D]."""

    def anchors_of(ctx, frozen):
        teacher_state, parts = frozen
        clip = nnx.merge(graphdef, teacher_state, copy=True)
        return losses.l2_normalize(prompts.prompt_features(clip, ctx, parts))

    return anchors_of


def make_train_step(graphdef, tx, logit_scale):
    """The jitted Stage-PSC step `(state, (teacher_state, parts), batch) -> (state, metrics)`;
    only the context vectors `state["ctx"]` are trained."""
    anchors_of = anchors_fn(graphdef)

    @jax.jit
    def train_step(state, frozen, batch):
        def loss_fn(ctx):
            return losses.coop_ce(
                batch["features"], anchors_of(ctx, frozen), batch["label"], logit_scale
            )

        loss, grads = jax.value_and_grad(loss_fn)(state["ctx"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["ctx"])
        return (
            {"ctx": optax.apply_updates(state["ctx"], updates), "opt_state": opt_state},
            {"loss": loss, "grad_norm": optax.tree.norm(grads)},
        )

    return train_step


def teacher_image_features(
    clip, info, split, cfg, mesh, workdir, teacher_id
) -> dict[str, np.ndarray]:
    """L2-normalised teacher image embeddings [N, D] and labels [N] of a split, cached."""
    size = cfg["feature_image_size"]

    def compute():
        loader = setup.eval_loader(
            info, split, cfg, size, FEATURE_RESIZE, cfg["feature_batch_size"], mesh
        )
        encode = devices.jit_apply(
            clip,
            lambda m, b: losses.l2_normalize(
                m.encode_image(augment.eval_transform(b["image"], size))
            ),
            mesh,
            cfg["teacher_sharding"],
        )
        feats, labels = devices.run_over_split(encode, loader, mesh, f"teacher features ({split})")
        return {"features": feats.astype(np.float32), "labels": labels.astype(np.int32)}

    key = dict(
        teacher=teacher_id,
        dataset=info.key,
        fingerprint=info.fingerprint,
        split=split,
        size=size,
        data_dir=str(cfg["data_dir"]),
        dtype=str(jnp.dtype(devices.compute_dtype(cfg["dtype"]))),
        version=1,
    )
    return features.cached_arrays(workdir / f"features_{split}.npz", key, compute)


def run(cfg: dict[str, Any], workdir: pathlib.Path, info) -> dict[str, Any]:
    info, skipped = setup.open_dataset(info, cfg)
    mesh = devices.make_mesh()
    dtype = devices.compute_dtype(cfg["dtype"])
    clip, teacher_id = setup.load_teacher(cfg["teacher"], dtype)
    clip.check_image_size(cfg["feature_image_size"], "feature_image_size")
    train_split = setup.train_split(info, cfg)
    n_train, batch = len(setup.load_split(info, train_split, cfg)), cfg["batch_size"]
    steps_per_epoch = setup.steps_per_epoch(n_train // batch, cfg)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {batch} is larger than the {n_train} training examples "
            f"of {info.key}; lower it with --batch-size"
        )
    setup.claim_workdir(workdir, cfg, info, skipped)
    native = clip.config.vision.image_size
    if cfg["feature_image_size"] != native and jax.process_index() == 0:
        # The paper's 256 px is the full-size teacher's own; a smaller ConvNeXt keeps it unless
        # told otherwise, so that a config means the same run whatever teacher it names (a ViT
        # takes its own size only: check_image_size above refused any other).
        print(
            f"note: the teacher {teacher_id} was trained at {native} px; its features are "
            f"computed at feature_image_size={cfg['feature_image_size']} px (--set "
            f"feature_image_size={native} to follow the teacher)",
            flush=True,
        )

    select_split = info.val_split or info.test_split
    splits = dict.fromkeys([train_split, info.test_split, select_split])
    data = {
        s: teacher_image_features(clip, info, s, cfg, mesh, workdir, teacher_id) for s in splits
    }
    train = data[train_split]

    parts = prompts.prompt_parts(clip, info.class_names, info.prompt_template, cfg["n_ctx"])
    graphdef, teacher_state = nnx.split(clip)
    frozen = (
        devices.place_frozen(mesh, teacher_state, cfg["teacher_sharding"]),
        devices.replicate(mesh, parts),
    )
    logit_scale = jnp.exp(clip.logit_scale[...])

    anchors_of = anchors_fn(graphdef)
    tx = optimizer(cfg, cfg["epochs"] * steps_per_epoch)
    ctx = prompts.init_context(
        jax.random.key(cfg["seed"]), cfg["n_ctx"], clip.config.text.width, cfg["ctx_init_std"]
    )
    state = devices.replicate(mesh, {"ctx": ctx, "opt_state": tx.init(ctx)})

    train_step = make_train_step(graphdef, tx, logit_scale)
    eval_data = {
        s: devices.replicate(mesh, (data[s]["features"], data[s]["labels"])) for s in splits
    }

    anchors_jit = jax.jit(anchors_of)

    @jax.jit
    def top1(anchors, feats, labels):
        return jnp.mean(jnp.argmax(feats @ anchors.T, -1) == labels)

    def batches(epoch, start):
        order = pipeline.epoch_order(n_train, batch, train=True, seed=cfg["seed"], epoch=epoch)
        lo, hi = setup.process_slice(batch)
        for idx in order[start:steps_per_epoch, lo:hi]:
            yield devices.to_global(
                mesh, {"features": train["features"][idx], "label": train["labels"][idx]}
            )

    def evaluate(state):
        anchors = anchors_jit(state["ctx"], frozen)  # one text-tower pass for every split
        scores = {s: float(top1(anchors, *eval_data[s])) for s in splits}
        return {
            "top1": scores[info.test_split],
            "select": scores[select_split],
            **({"val_top1": scores[select_split]} if select_split != info.test_split else {}),
        }

    def export_best(state, scores):
        anchors = np.asarray(jax.device_get(anchors_jit(state["ctx"], frozen)))
        if jax.process_index() == 0:
            anchors_lib.save(
                workdir / "anchors.npz",
                anchors,
                info,
                teacher_id=teacher_id,
                n_ctx=cfg["n_ctx"],
                prompt_template=info.prompt_template,
                top1=scores["top1"],
                select=scores["select"],
                select_split=select_split,
                features={
                    "image_size": cfg["feature_image_size"],
                    "resize": FEATURE_RESIZE,
                    "dtype": np.dtype(dtype).name,
                },
            )

    task = loop.Task(
        "psc",
        steps_per_epoch,
        batch,
        batches,
        lambda s, b, e: train_step(s, frozen, b),
        evaluate,
        export_best,
    )
    test = data[info.test_split]
    template = prompts.template_anchors(clip, info.class_names, info.prompt_template)
    zero_shot = float(np.mean(np.argmax(test["features"] @ template.T, -1) == test["labels"]))
    summary = loop.fit(
        task,
        state,
        epochs=cfg["epochs"],
        workdir=workdir,
        checkpoints_to_keep=cfg["checkpoints_to_keep"],
        summary_extra={
            "dataset": info.key,
            "method": "coop",
            "teacher": teacher_id,
            "compute_dtype": np.dtype(dtype).name,
            "anchors": str(workdir / "anchors.npz"),
            "select_split": select_split,
            "train_split": train_split,
            "zero_shot_top1": zero_shot,
        },
    )
    if summary["best_top1"] < zero_shot and jax.process_index() == 0:
        print(
            f"warning: the learned prompts ({100 * summary['best_top1']:.2f}%) score below the "
            f"hand-written template they started beside ({100 * zero_shot:.2f}% zero-shot) on "
            f"{info.test_split}; train longer or with another optimizer.lr, or use --no-psc",
            flush=True,
        )
    return summary
