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

import dataclasses
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
from pand_jax.train.stage import Stage

# How the teacher sees an image for its features: open_clip's evaluation preprocessing.
FEATURE_RESIZE = "shorter_center_crop"


def optimizer(cfg: dict[str, Any], total_steps: int) -> optax.GradientTransformation:
    """Paper: SGD 0.002, momentum 0.9, no weight decay; cosine to 0; optional clipping
    (the released code clips at 1.0)."""
    opt = cfg["optimizer"]
    schedule = (
        optax.cosine_decay_schedule(opt["lr"], total_steps)
        if opt["schedule"] == "cosine"
        else optax.constant_schedule(opt["lr"])
    )
    parts = [optax.clip_by_global_norm(opt["grad_clip"])] if opt["grad_clip"] else []
    if opt["weight_decay"]:
        parts.append(optax.add_decayed_weights(opt["weight_decay"]))
    parts.append(optax.sgd(schedule, momentum=opt["momentum"]))
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


@dataclasses.dataclass(frozen=True)
class Splits:
    """The splits Stage-PSC reads: it trains on one, reports test, and picks the best epoch on
    `select` (the dataset's val split where it has one, else test, as the released code does)."""

    train: str
    test: str
    select: str

    @property
    def all(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.train, self.test, self.select]))


def run(cfg: dict[str, Any], workdir: pathlib.Path, info) -> dict[str, Any]:
    stage = Stage.open("psc", cfg, workdir, info)
    clip, teacher_id = stage.load_teacher("feature_image_size")
    test = stage.info.test_split
    splits = Splits(stage.train_split, test, stage.info.val_split or test)
    n_train = len(setup.load_split(stage.info, splits.train, cfg))
    steps_per_epoch = _steps_per_epoch(stage, n_train)
    stage.claim()
    _note_feature_size(clip, teacher_id, cfg)
    data = {s: teacher_image_features(stage, clip, teacher_id, s) for s in splits.all}
    task, state, zero_shot = _task(
        stage, clip, data, splits=splits, steps_per_epoch=steps_per_epoch, teacher_id=teacher_id
    )
    summary = stage.fit(
        task,
        state,
        {
            "method": "coop",
            "teacher": teacher_id,
            "anchors": str(workdir / "anchors.npz"),
            "select_split": splits.select,
            "zero_shot_top1": zero_shot,
        },
    )
    _warn_below_zero_shot(summary["best_top1"], zero_shot, splits.test)
    return summary


def _steps_per_epoch(stage: Stage, n_train: int) -> int:
    batch = stage.cfg["batch_size"]
    steps = setup.steps_per_epoch(n_train // batch, stage.cfg)
    if steps == 0:
        raise ValueError(
            f"batch_size {batch} is larger than the {n_train} training examples "
            f"of {stage.info.key}; lower it with --batch-size"
        )
    return steps


def _note_feature_size(clip, teacher_id: str, cfg: dict[str, Any]) -> None:
    native = clip.config.vision.image_size
    if cfg["feature_image_size"] != native and jax.process_index() == 0:
        # The paper's 256 px is the full-size teacher's own; a smaller ConvNeXt keeps it unless
        # told otherwise, so that a config means the same run whatever teacher it names (a ViT
        # takes its own size only: the teacher's check refused any other).
        print(
            f"note: the teacher {teacher_id} was trained at {native} px; its features are "
            f"computed at feature_image_size={cfg['feature_image_size']} px (--set "
            f"feature_image_size={native} to follow the teacher)",
            flush=True,
        )


def teacher_image_features(stage: Stage, clip, teacher_id: str, split: str):
    """L2-normalised teacher image embeddings [N, D] and labels [N] of a split, cached."""
    cfg, size = stage.cfg, stage.cfg["feature_image_size"]

    def compute():
        loader = stage.eval_loader(
            split, size=size, resize=FEATURE_RESIZE, batch=cfg["feature_batch_size"]
        )
        encode = devices.jit_apply(
            clip,
            lambda m, b: losses.l2_normalize(
                m.encode_image(augment.eval_transform(b["image"], size))
            ),
            stage.mesh,
            cfg["teacher_sharding"],
        )
        feats, labels = devices.run_over_split(
            encode, loader, stage.mesh, f"teacher features ({split})"
        )
        return {"features": feats.astype(np.float32), "labels": labels.astype(np.int32)}

    key = dict(
        teacher=teacher_id,
        dataset=stage.info.key,
        fingerprint=stage.info.fingerprint,
        split=split,
        size=size,
        data_dir=str(cfg["data_dir"]),
        dtype=str(jnp.dtype(stage.dtype)),
        version=1,
    )
    return features.cached_arrays(stage.workdir / f"features_{split}.npz", key, compute)


def _task(stage: Stage, clip, data, *, splits: Splits, steps_per_epoch: int, teacher_id: str):
    """(the loop's task, the initial state, the template prompt's zero-shot test top-1)."""
    cfg, mesh = stage.cfg, stage.mesh
    parts = prompts.prompt_parts(
        clip, stage.info.class_names, stage.info.prompt_template, cfg["n_ctx"]
    )
    graphdef, teacher_state = nnx.split(clip)
    frozen = (
        devices.place_frozen(mesh, teacher_state, cfg["teacher_sharding"]),
        devices.replicate(mesh, parts),
    )
    tx = optimizer(cfg, cfg["epochs"] * steps_per_epoch)
    ctx = prompts.init_context(
        jax.random.key(cfg["seed"]), cfg["n_ctx"], clip.config.text.width, cfg["ctx_init_std"]
    )
    state = devices.replicate(mesh, {"ctx": ctx, "opt_state": tx.init(ctx)})
    train_step = make_train_step(graphdef, tx, jnp.exp(clip.logit_scale[...]))
    anchors_of = jax.jit(anchors_fn(graphdef))
    task = loop.Task(
        "psc",
        steps_per_epoch,
        cfg["batch_size"],
        _batches(stage, data[splits.train], steps_per_epoch),
        lambda s, b, e: train_step(s, frozen, b),
        _evaluator(mesh, lambda s: anchors_of(s["ctx"], frozen), data, splits),
        _exporter(stage, lambda s: anchors_of(s["ctx"], frozen), splits, teacher_id),
    )
    template = prompts.template_anchors(clip, stage.info.class_names, stage.info.prompt_template)
    test = data[splits.test]
    zero_shot = float(np.mean(np.argmax(test["features"] @ template.T, -1) == test["labels"]))
    return task, state, zero_shot


def _batches(stage: Stage, train: dict[str, np.ndarray], steps_per_epoch: int):
    """(epoch, start step) -> the epoch's batches of cached features, from `start` on."""
    batch, seed = stage.cfg["batch_size"], stage.cfg["seed"]

    def batches(epoch, start):
        order = pipeline.epoch_order(
            len(train["labels"]), batch, train=True, seed=seed, epoch=epoch
        )
        lo, hi = setup.process_slice(batch)
        for idx in order[start:steps_per_epoch, lo:hi]:
            yield devices.to_global(
                stage.mesh, {"features": train["features"][idx], "label": train["labels"][idx]}
            )

    return batches


def _evaluator(mesh, anchors_of, data, splits: Splits):
    """state -> {"top1": test, "select": the selection split's[, "val_top1"]}, from one
    text-tower pass for every split."""
    eval_data = {
        s: devices.replicate(mesh, (data[s]["features"], data[s]["labels"])) for s in splits.all
    }

    @jax.jit
    def top1(anchors, feats, labels):
        return jnp.mean(jnp.argmax(feats @ anchors.T, -1) == labels)

    def evaluate(state):
        anchors = anchors_of(state)
        scores = {s: float(top1(anchors, *eval_data[s])) for s in splits.all}
        val = {"val_top1": scores[splits.select]} if splits.select != splits.test else {}
        return {"top1": scores[splits.test], "select": scores[splits.select], **val}

    return evaluate


def _exporter(stage: Stage, anchors_of, splits: Splits, teacher_id: str):
    """(state, scores) -> anchors.npz of that state's prompts, with what made them."""
    cfg = stage.cfg

    def export_best(state, scores):
        anchors = np.asarray(jax.device_get(anchors_of(state)))
        if jax.process_index() == 0:
            anchors_lib.save(
                stage.workdir / "anchors.npz",
                anchors,
                stage.info,
                teacher_id=teacher_id,
                n_ctx=cfg["n_ctx"],
                prompt_template=stage.info.prompt_template,
                top1=scores["top1"],
                select=scores["select"],
                select_split=splits.select,
                features={
                    "image_size": cfg["feature_image_size"],
                    "resize": FEATURE_RESIZE,
                    "dtype": np.dtype(stage.dtype).name,
                },
            )

    return export_best


def _warn_below_zero_shot(best_top1: float, zero_shot: float, test_split: str) -> None:
    if best_top1 < zero_shot and jax.process_index() == 0:
        print(
            f"warning: the learned prompts ({100 * best_top1:.2f}%) score below the "
            f"hand-written template they started beside ({100 * zero_shot:.2f}% zero-shot) on "
            f"{test_split}; train longer or with another optimizer.lr, or use --no-psc",
            flush=True,
        )
