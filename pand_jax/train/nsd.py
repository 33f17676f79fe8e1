"""Stage-NSD: distil the frozen CLIP teacher into a ResNet-18 / MobileNet-V2 student (or a
prompted CLIP image tower, `--student clip:DIR`) with one of the methods of `pand_jax.methods`
(`method`): its entry says which teacher signal the step computes, where the text anchors come
from, which heads train beside the student and what the objective is. `no_psc` swaps learned anchors for template ones (PAND's "+NSD only" ablation).

Teacher and student see the same augmented view, regenerated on device from
(seed, example index, epoch or cached view).
"""

from __future__ import annotations

import functools
import itertools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pand_jax import anchors as anchors_lib
from pand_jax import devices, methods, prompts, soft_labels
from pand_jax.data import augment, pipeline
from pand_jax.models import clip_student
from pand_jax.models import student as student_lib
from pand_jax.train import loop, setup, teacher_cache


def optimizer(
    cfg: dict[str, Any], steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Any]:
    """Paper: AdamW 1e-4, weight decay 1e-4, cosine to 1e-5 over the run. "cosine_periodic" is
    the released code's CosineAnnealingLR(T_max=`t_max_epochs`, eta_min=end_lr) run past T_max:
    down to end_lr over T_max epochs, back up to lr over the next T_max, and so on (no restart).
    Both change the learning rate every step. `optimizer.name` "sgd" (momentum, weight decay
    added to the gradient as PyTorch's SGD does) and `warmup_epochs` at a constant `warmup_lr`
    before the cosine are the CLIP-student recipes' (PromptKD's, FDBPL's; configs/recipes/)."""
    o, epochs = cfg["optimizer"], cfg["epochs"]
    lr, end_lr = o["lr"], o["end_lr"]
    warmup = min(o["warmup_epochs"], epochs) * steps_per_epoch
    if o["schedule"] == "cosine":
        schedule = optax.cosine_decay_schedule(
            lr, max(epochs * steps_per_epoch - warmup, 1), alpha=end_lr / lr
        )
    elif o["schedule"] == "cosine_periodic":
        t_max = max(o["t_max_epochs"] * steps_per_epoch, 1)

        def schedule(step):  # optax's cosine schedules stop at the end or restart; this swings
            return end_lr + (lr - end_lr) * 0.5 * (1 + jnp.cos(jnp.pi * step / t_max))
    else:
        raise ValueError(
            f"optimizer.schedule must be 'cosine' or 'cosine_periodic', got {o['schedule']!r}"
        )
    if warmup:
        schedule = optax.join_schedules(
            [optax.constant_schedule(o["warmup_lr"]), schedule], [warmup]
        )
    parts = [optax.clip_by_global_norm(o["grad_clip"])] if o["grad_clip"] else []
    if o["name"] == "sgd":
        parts += [
            optax.add_decayed_weights(o["weight_decay"]),
            optax.sgd(schedule, momentum=o["momentum"] or None),
        ]
    else:
        parts.append(optax.adamw(schedule, eps=o["eps"], weight_decay=o["weight_decay"]))
    return optax.chain(*parts), schedule


def text_anchors(
    method: methods.Method, anchors_path: str | None, no_psc: bool, info, clip, teacher_id: str
):
    """(anchors [C, D], learned?) for the method: an anchors file when given (Stage-PSC's, made
    with this run's teacher), templates otherwise; a method that wants learned anchors needs the
    file unless `no_psc`."""
    if method.anchors is None:
        return None, False
    if anchors_path:
        anchors, meta = anchors_lib.load(anchors_path, info)
        anchors_lib.check_teacher(anchors_path, anchors, meta, teacher_id, clip.config.embed_dim)
        return anchors, True
    if method.wants_learned_anchors(no_psc):
        raise ValueError(
            f"{method.label} needs learned anchors: pass --anchors FILE (written by "
            f"python train.py --stage psc --dataset {info.key}), or --no-psc for "
            "template anchors"
        )
    return prompts.template_anchors(clip, info.class_names, info.prompt_template), False


def _clip_student(cfg: dict[str, Any], info, head_dim: int | None, dual, dtype, rngs):
    """`clip:DIR`'s prompted image tower. Its classes: DIR's text features of the class
    prompts; with `student_text_context` = n a CoOp context of n vectors on its text tower;
    with `dual` = (positive words, negative words, template) (FDBPL) two contexts starting as
    those words; with `head_dim` an anchor head."""
    path = clip_student.clip_dir(cfg["student"])
    clip, _ = setup.load_teacher(
        path,
        dtype,
        hint="Convert a ViT CLIP there with: python "
        "convert_weights.py --model ViT-B-16 --pretrained TAG "
        f"--out {path}",
    )
    clip_student.check_tower(clip, path, cfg["image_size"])

    def context(template: str, init) -> tuple:
        p = prompts.prompt_parts(clip, info.class_names, template, init.shape[0])
        return p.prefix, p.suffix, p.eot_index, init

    features = positive = negative = None
    n_ctx, width = cfg["student_text_context"], clip.config.text.width
    if dual:
        positive, negative = (
            context(dual[2], prompts.word_context(clip, words)) for words in dual[:2]
        )
    elif n_ctx:
        positive = context(
            info.prompt_template,
            prompts.init_context(rngs.params(), n_ctx, width, clip_student.PROMPT_INIT_STD),
        )
    elif head_dim is None:
        features = prompts.template_anchors(clip, info.class_names, info.prompt_template)
    return clip_student.from_clip(
        clip,
        info.num_classes,
        features,
        prompt_tokens=cfg["student_prompt_tokens"],
        prompt_depth=cfg["student_prompt_depth"],
        train=cfg["student_train"],
        head_dim=head_dim,
        dtype=dtype,
        rngs=rngs,
        text_prompts=positive,
        negative_prompts=negative,
    )


def build_student(
    cfg: dict[str, Any], info, head_dim: int | None, dtype, rngs: nnx.Rngs, dual=None
):
    """The run's student in train mode: a torchvision backbone (converted ImageNet weights from
    `student_weights`, or from scratch when null) with a fresh head (an anchor head with
    `head_dim`), or for clip:DIR that CLIP's prompted image tower (`_clip_student`)."""
    student = cfg["student"]
    if clip_student.is_clip(student):
        return _clip_student(cfg, info, head_dim, dual, dtype, rngs)
    if cfg["student_weights"]:
        return student_lib.student_from_pretrained(
            cfg["student_weights"].format(student=student),
            info.num_classes,
            rngs=rngs,
            head_dim=head_dim,
            dtype=dtype,
        )
    model = student_lib.Student(
        student, info.num_classes, head_dim=head_dim, dtype=dtype, rngs=rngs
    )
    model.train()
    return model


def build_model(
    method: methods.Method, cfg: dict[str, Any], info, teacher_dim: int, dtype, classes=None
) -> student_lib.Distillee:
    """The student (`build_student`) and the method's heads, in train mode. `classes` =
    (anchors [C, D], scale s) gives the student an anchor head (`method.anchor_head_for`)
    classifying by s L2norm(P(h)) T_hat^T."""
    rngs = nnx.Rngs(cfg["seed"])
    dual = method.dual_prompts(cfg["loss"]) if method.dual_prompts else None
    model = build_student(
        cfg, info, None if classes is None else classes[0].shape[1], dtype, rngs, dual
    )
    if classes is not None:
        model.classifier.set_classes(*classes)
    distillee = student_lib.Distillee(model, method.heads(model.num_features, teacher_dim, rngs))
    distillee.train()
    return distillee


def make_loss(
    method: methods.Method,
    loss_cfg: dict[str, Any],
    learned_anchors: bool,
    num_epochs: int,
    dataset: str,
):
    """loss(model, images_student, labels, t, anchors, epoch, q, intermediate) -> (total,
    terms): the student forward, then the method's objective with its settings from the `loss`
    config. `labels` is None for a method that reads none (the batches then carry none); `q` is
    the teacher's class distribution from a sparse teacher cache (then `t` is None);
    `intermediate` DAIT's frozen intermediate teacher's (map, logits)."""
    objective = functools.partial(
        method.objective, **method.settings(loss_cfg, num_epochs, learned_anchors, dataset)
    )

    def loss(model, images, labels, t, anchors, epoch, q=None, intermediate=None):
        student = model.student
        feature_map, features = student.encode(images)
        negative_logits, text_pair = student.negative(features) or (None, None)
        return objective(
            methods.Inputs(
                logits=student.logits(features),
                features=features,
                negative_logits=negative_logits,
                text_pair=text_pair,
                labels=labels if method.reads_labels else None,
                teacher=t,
                anchors=anchors,
                heads=model.heads,
                epoch=epoch,
                teacher_probs=q,
                feature_map=feature_map,
                intermediate=intermediate,
            )
        )

    return loss


def sparse_labels(cfg: dict[str, Any], method: methods.Method, anchors):
    """What a sparse teacher cache stores (`--soft-labels`): the top-K of the method's teacher
    distribution softmax(s t_hat T_hat^T / T) over the run's anchors; None for embeddings."""
    kind = cfg["soft_labels"]
    if kind == "embedding":
        return None
    return soft_labels.SoftLabels(
        kind,
        1 if kind == "hard" else cfg["soft_labels_k"],
        np.asarray(anchors),
        *method.teacher_distribution(cfg["loss"]),
    )


def init_state(model: student_lib.Distillee, tx) -> tuple[Any, dict]:
    """(graphdef, train state): trainable params, the rest (BatchNorm statistics, a CLIP
    student's frozen tower), optimizer, step."""
    graphdef, params, rest = nnx.split(model, student_lib.trainable(model.student), ...)
    return graphdef, {
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }


def make_train_step(cfg, graphdef, loss_fn, tx, schedule, t_graphdef=None, it_graphdef=None):
    """The jitted Stage-NSD step `(state, (teacher_state, anchors[, it_state]), batch, epoch)
    -> (state, metrics)`, donating `state`. With `it_graphdef` the frozen intermediate teacher
    (DAIT) runs on the student's view too.

    What the step does follows the batch's structure (static under jit): with
    batch["teacher"] the teacher's embeddings come from the cache, with batch["teacher_index"]
    and ["teacher_value"] its sparse soft labels (`soft_labels.reconstruct` of
    cfg["soft_labels"]'s kind); otherwise the teacher runs
    online when `t_graphdef` is given (no teacher at all for a method that reads none). With
    batch["view"] each example uses that augmented view, otherwise a fresh one per epoch.
    """
    seed, recipe, size = cfg["seed"], cfg["augment"], cfg["image_size"]

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, frozen, batch, epoch):
        view = batch.get("view", epoch)
        images = augment.augment(
            batch["image"], augment.example_keys(seed, batch["index"], view), recipe, size
        )
        t_state, anchors, *it_state = frozen
        q = intermediate = None
        if it_graphdef is not None:
            it = nnx.merge(it_graphdef, it_state[0], copy=True)
            it_map, it_features = it.encode(images)
            intermediate = jax.lax.stop_gradient(
                (it_map.astype(jnp.float32), it.classifier(it_features))
            )
        if "teacher_index" in batch:
            t = None
            q = soft_labels.reconstruct(
                batch["teacher_index"], batch["teacher_value"], cfg["soft_labels"], anchors.shape[0]
            )
        elif "teacher" in batch:
            t = batch["teacher"].astype(jnp.float32)
        elif t_graphdef is not None:
            teacher = nnx.merge(t_graphdef, t_state, copy=True)
            t = jax.lax.stop_gradient(teacher.encode_image(images)).astype(jnp.float32)
        else:
            t = None

        def objective(params):
            model = nnx.merge(graphdef, params, state["rest"], copy=True)
            total, parts = loss_fn(
                model, images, batch.get("label"), t, anchors, epoch, q, intermediate
            )
            return total, (parts, nnx.split(model, student_lib.trainable(model.student), ...)[2])

        (total, (parts, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "rest": rest,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        # The loop stops on a non-finite loss term or gradient norm (read one step late).
        return new_state, {
            "loss": total,
            **parts,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
        }

    return train_step


def run(cfg: dict[str, Any], workdir: pathlib.Path, info) -> dict[str, Any]:
    """Trains (or resumes) the run; `info` is its dataset as the CLI resolved it."""
    unlabeled, skipped_unlabeled = setup.open_unlabeled(cfg)
    n_unlabeled = len(unlabeled.paths) - len(skipped_unlabeled) if unlabeled else 0
    info, skipped = setup.open_dataset(info, cfg, n_unlabeled)
    method = methods.get(cfg["method"])
    mesh = devices.make_mesh()
    batch, views = cfg["batch_size"], cfg["teacher_cache"]
    dtype = devices.compute_dtype(cfg["dtype"])
    needs_teacher = method.reads_clip
    cached = needs_teacher and views > 0 and not cfg["teacher_cache_online"]

    clip, teacher_id = setup.load_teacher(cfg["teacher"], dtype) if needs_teacher else (None, None)
    if clip is not None:  # the teacher sees the student's view (a ViT takes its own size only)
        clip.check_image_size(cfg["image_size"], "image_size")
    it = (
        setup.load_intermediate(cfg["intermediate_teacher"], info, dtype)
        if method.teacher == methods.INTERMEDIATE
        else None
    )
    anchors, learned = text_anchors(method, cfg["anchors"], cfg["no_psc"], info, clip, teacher_id)
    teacher_dim = (
        clip.config.embed_dim if clip is not None else it.num_features if it is not None else 1
    )
    anchor_head = method.anchor_head_for(clip_student.is_clip(cfg["student"]))
    classes = (anchors, anchor_head(cfg["loss"])) if anchor_head else None
    model = build_model(method, cfg, info, teacher_dim, dtype, classes)

    train_split = setup.train_split(info, cfg)
    train_source = setup.train_source(info, train_split, cfg, unlabeled)
    train_loader = pipeline.Loader(
        train_source,
        global_batch_size=batch,
        image_size=cfg["host_image_size"],
        resize="stretch",
        train=True,
        seed=cfg["seed"],
        cache_dir=setup.host_cache_dir(cfg, workdir),
    )
    spe = setup.steps_per_epoch(train_loader.steps_per_epoch, cfg)
    tx, schedule = optimizer(cfg, spe)
    loss_fn = make_loss(method, cfg["loss"], learned, cfg["epochs"], info.key)
    size, recipe, seed = cfg["image_size"], cfg["augment"], cfg["seed"]
    # Every check has passed.
    setup.claim_workdir(workdir, cfg, info, skipped + skipped_unlabeled, unlabeled)

    cache = None
    if cached:
        cache = teacher_cache.build(
            clip,
            train_source,
            views=views,
            seed=seed,
            recipe=recipe,
            host_image_size=cfg["host_image_size"],
            image_size=size,
            batch_size=cfg["eval_batch_size"],
            mesh=mesh,
            teacher_sharding=cfg["teacher_sharding"],
            key=dict(
                teacher=teacher_id,
                dataset=info.key,
                split=train_split,
                data_dir=str(cfg["data_dir"]),
            ),
            path=pathlib.Path(cfg["teacher_cache_dir"] or workdir / "teacher_cache"),
            compute_dtype=dtype,
            dtype=cfg["teacher_cache_dtype"],
            soft_labels=sparse_labels(cfg, method, anchors),
        )
    # What the method cost in teacher forward passes: the cache's views (however many runs
    # share it), or one per image of every step online.
    # DAIT's are its intermediate teacher's: the CLIP teacher ran when that was trained.
    teacher_forwards = (
        setup.intermediate_teacher_forwards(cfg["intermediate_teacher"])
        if it is not None
        else 0
        if not needs_teacher
        else len(train_source) * views
        if cached
        else cfg["epochs"] * spe * batch
    )

    graphdef, state = init_state(model, tx)
    trainable = sum(x.size for x in jax.tree.leaves(state["params"]))
    state = devices.replicate(mesh, state)
    online = needs_teacher and not cached
    t_graphdef, t_state = nnx.split(clip) if online else (None, None)
    it_graphdef, it_state = nnx.split(it) if it is not None else (None, None)
    frozen = (
        devices.place_frozen(mesh, t_state, cfg["teacher_sharding"]),
        devices.replicate(mesh, None if anchors is None else jnp.asarray(anchors)),
    )
    frozen += (devices.replicate(mesh, it_state),) if it is not None else ()
    train_step = make_train_step(cfg, graphdef, loss_fn, tx, schedule, t_graphdef, it_graphdef)

    def batches(epoch, start):
        if views:
            epoch_views = teacher_cache.views_for_epoch(seed, epoch, len(train_source), views)
        for b in itertools.islice(train_loader.epoch(epoch, start), spe - start):
            # A method that reads no labels gets batches without them: nothing can read them.
            b = {
                k: b[k] for k in ("image", "label", "index") if k != "label" or method.reads_labels
            }
            if views:
                b["view"] = epoch_views[b["index"]]
            if cached:
                b.update(cache.lookup(b["index"], b["view"]))
            yield devices.to_global(mesh, b)

    eval_size = cfg["image_size"]
    test_loader = setup.eval_loader(
        info,
        info.test_split,
        cfg,
        eval_size,
        "stretch",
        cfg["eval_batch_size"],
        mesh,
        setup.host_cache_dir(cfg, workdir),
    )

    @jax.jit
    def predict(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        return jnp.argmax(model.student(augment.eval_transform(batch["image"], eval_size)), -1)

    def evaluate(state):
        preds, labels = devices.run_over_split(
            lambda b: predict(state["params"], state["rest"], b), test_loader, mesh, "evaluate"
        )
        top1 = float(np.mean(preds == labels))
        return {"top1": top1, "select": top1}

    def export_best(state, scores):
        # Every process takes part: orbax saves are collective (the primary writes).
        best = nnx.merge(graphdef, *jax.device_get((state["params"], state["rest"])))
        best.student.eval()
        student_lib.save_student(
            workdir / "student",
            best.student.folded(),
            dataset=info.key,
            class_names=list(info.class_names),
            top1=scores["top1"],
            method=cfg["method"],
            image_size=cfg["image_size"],
        )

    task = loop.Task(
        "nsd",
        spe,
        batch,
        batches,
        lambda s, b, e: train_step(s, frozen, b, jnp.int32(e)),
        evaluate,
        export_best,
    )
    return loop.fit(
        task,
        state,
        epochs=cfg["epochs"],
        workdir=workdir,
        checkpoints_to_keep=cfg["checkpoints_to_keep"],
        summary_extra={
            "dataset": info.key,
            "method": cfg["method"],
            "student": cfg["student"],
            "teacher": teacher_id,
            "compute_dtype": np.dtype(dtype).name,
            "train_split": train_split,
            "train_examples": len(train_source),
            "unlabeled_examples": n_unlabeled,
            "learned_anchors": learned,
            "no_psc": cfg["no_psc"],
            "loss": {k: cfg["loss"][k] for k in method.sections},
            "teacher_cache_views": views,
            "teacher_mode": "cached" if cached else "online" if needs_teacher else method.teacher,
            "teacher_forwards": teacher_forwards,
            "trainable_parameters": trainable,
        },
    )
