"""Stage-NSD: distil the frozen CLIP teacher into a ResNet-18 / MobileNet-V2 student (or a
prompted CLIP image tower, `--student clip:DIR`) with one of the methods of `pand_jax.methods`
(`method`): its entry says which teacher signal the step computes, where the text anchors come
from, which heads train beside the student and what the objective is. `no_psc` swaps learned
anchors for template ones (PAND's "+NSD only" ablation).

Teacher and student see the same augmented view, regenerated on device from
(seed, example index, epoch or cached view).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
from typing import Any, NamedTuple

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
from pand_jax.train.stage import Stage


def optimizer(
    cfg: dict[str, Any], steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Any]:
    """Paper: AdamW 1e-4, weight decay 1e-4, cosine to 1e-5 over the run. "cosine_periodic" is
    the released code's CosineAnnealingLR(T_max=`t_max_epochs`, eta_min=end_lr) run past T_max:
    down to end_lr over T_max epochs, back up to lr over the next T_max, and so on (no restart).
    Both change the learning rate every step. `optimizer.name` "sgd" (momentum, weight decay
    added to the gradient as PyTorch's SGD does) and `warmup_epochs` at a constant `warmup_lr`
    before the cosine are the CLIP-student recipes' (PromptKD's, FDBPL's; configs/recipes/)."""
    opt, epochs = cfg["optimizer"], cfg["epochs"]
    lr, end_lr = opt["lr"], opt["end_lr"]
    warmup = min(opt["warmup_epochs"], epochs) * steps_per_epoch
    if opt["schedule"] == "cosine":
        schedule = optax.cosine_decay_schedule(
            lr, max(epochs * steps_per_epoch - warmup, 1), alpha=end_lr / lr
        )
    elif opt["schedule"] == "cosine_periodic":
        t_max = max(opt["t_max_epochs"] * steps_per_epoch, 1)

        def schedule(step):  # optax's cosine schedules stop at the end or restart; this swings
            return end_lr + (lr - end_lr) * 0.5 * (1 + jnp.cos(jnp.pi * step / t_max))
    else:
        raise ValueError(
            f"optimizer.schedule must be 'cosine' or 'cosine_periodic', got {opt['schedule']!r}"
        )
    if warmup:
        schedule = optax.join_schedules(
            [optax.constant_schedule(opt["warmup_lr"]), schedule], [warmup]
        )
    parts = [optax.clip_by_global_norm(opt["grad_clip"])] if opt["grad_clip"] else []
    if opt["name"] == "sgd":
        parts += [
            optax.add_decayed_weights(opt["weight_decay"]),
            optax.sgd(schedule, momentum=opt["momentum"] or None),
        ]
    else:
        parts.append(optax.adamw(schedule, eps=opt["eps"], weight_decay=opt["weight_decay"]))
    return optax.chain(*parts), schedule


def _clip_student(cfg: dict[str, Any], info, *, head_dim: int | None, dual, dtype, rngs):
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
    cfg: dict[str, Any], info, *, head_dim: int | None, dtype, rngs: nnx.Rngs, dual=None
):
    """The run's student in train mode: a torchvision backbone (converted ImageNet weights from
    `student_weights`, or from scratch when null) with a fresh head (an anchor head with
    `head_dim`), or for clip:DIR that CLIP's prompted image tower (`_clip_student`)."""
    student = cfg["student"]
    if clip_student.is_clip(student):
        return _clip_student(cfg, info, head_dim=head_dim, dual=dual, dtype=dtype, rngs=rngs)
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
    method: methods.Method,
    cfg: dict[str, Any],
    info,
    *,
    teacher_dim: int | None,
    dtype,
    classes=None,
) -> student_lib.Distillee:
    """The student (`build_student`) and the method's heads, in train mode. `teacher_dim` is
    the width of the teacher signal the heads read (None: the method reads no teacher).
    `classes` = (anchors [C, D], scale s) gives the student an anchor head
    (`method.anchor_head_for`) classifying by s L2norm(P(h)) T_hat^T."""
    rngs = nnx.Rngs(cfg["seed"])
    dual = method.dual_prompts(cfg["loss"]) if method.dual_prompts else None
    head_dim = None if classes is None else classes[0].shape[1]
    model = build_student(cfg, info, head_dim=head_dim, dtype=dtype, rngs=rngs, dual=dual)
    if classes is not None:
        model.classifier.set_classes(*classes)
    distillee = student_lib.Distillee(model, method.heads(model.num_features, teacher_dim, rngs))
    distillee.train()
    return distillee


@dataclasses.dataclass(frozen=True)
class Teachers:
    """What a method learns from: the CLIP teacher (loaded when the method reads it) and its
    id, or DAIT's frozen intermediate teacher."""

    clip: Any = None
    clip_id: str | None = None
    intermediate: student_lib.Student | None = None

    @property
    def dim(self) -> int | None:
        """The width of the teacher signal the method's heads read; None: no teacher."""
        if self.clip is not None:
            return self.clip.config.embed_dim
        return None if self.intermediate is None else self.intermediate.num_features


def load_teachers(stage: Stage, method: methods.Method) -> Teachers:
    """The teachers `method` reads, checked against the run (the CLIP sees the student's view,
    and a ViT takes its own size only)."""
    clip, clip_id, intermediate = None, None, None
    if method.reads_clip:
        clip, clip_id = stage.load_teacher("image_size")
    if method.teacher == methods.INTERMEDIATE:
        intermediate = setup.load_intermediate(
            stage.cfg["intermediate_teacher"], stage.info, stage.dtype
        )
    return Teachers(clip, clip_id, intermediate)


def text_anchors(method: methods.Method, cfg: dict[str, Any], info, teachers: Teachers):
    """(anchors [C, D], learned?) for the method: an anchors file when given (Stage-PSC's, made
    with this run's teacher), templates otherwise; a method that wants learned anchors needs the
    file unless `no_psc`."""
    if method.anchors is None:
        return None, False
    clip, path = teachers.clip, cfg["anchors"]
    if path:
        anchors, meta = anchors_lib.load(path, info)
        anchors_lib.check_teacher(
            path, anchors, meta, teacher_id=teachers.clip_id, width=clip.config.embed_dim
        )
        return anchors, True
    if method.wants_learned_anchors(cfg["no_psc"]):
        raise ValueError(
            f"{method.label} needs learned anchors: pass --anchors FILE (written by "
            f"python train.py --stage psc --dataset {info.key}), or --no-psc for "
            "template anchors"
        )
    return prompts.template_anchors(clip, info.class_names, info.prompt_template), False


class Signals(NamedTuple):
    """What the teachers said about one batch (each None where the method reads no such
    signal): the CLIP's image embedding t [B, D], the anchors T [C, D], the teacher's class
    distribution q [B, C] from a sparse cache (then t is None), and DAIT's intermediate
    teacher's (map, logits)."""

    teacher: jax.Array | None = None
    anchors: jax.Array | None = None
    teacher_probs: jax.Array | None = None
    intermediate: tuple[jax.Array, jax.Array] | None = None


def make_loss(
    method: methods.Method,
    loss_cfg: dict[str, Any],
    *,
    learned_anchors: bool,
    num_epochs: int,
    dataset: str,
):
    """loss(model, images, *, labels, epoch, signals) -> (total, terms): the student forward, then
    the method's objective with its settings from the `loss` config. `labels` is None for a
    method that reads none (the batches then carry none)."""
    objective = functools.partial(
        method.objective, **method.settings(loss_cfg, num_epochs, learned_anchors, dataset)
    )

    def loss(model, images, *, labels, epoch, signals: Signals):
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
                teacher=signals.teacher,
                anchors=signals.anchors,
                heads=model.heads,
                epoch=epoch,
                teacher_probs=signals.teacher_probs,
                feature_map=feature_map,
                intermediate=signals.intermediate,
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


class Frozen(NamedTuple):
    """The step's frozen inputs: the online CLIP teacher's state (None when it is cached or not
    read), the anchors, and DAIT's intermediate teacher's state."""

    teacher: Any = None
    anchors: jax.Array | None = None
    intermediate: Any = None


def make_train_step(cfg, *, graphdef, loss_fn, tx, schedule, teacher=None, intermediate=None):
    """The jitted Stage-NSD step `(state, frozen: Frozen, batch, epoch) -> (state, metrics)`,
    donating `state`. `teacher` and `intermediate` are the graphdefs of the online CLIP teacher
    and of DAIT's frozen intermediate teacher, which runs on the student's view too.

    What the step does follows the batch's structure (static under jit): with
    batch["teacher"] the teacher's embeddings come from the cache, with batch["teacher_index"]
    and ["teacher_value"] its sparse soft labels (`soft_labels.reconstruct` of
    cfg["soft_labels"]'s kind); otherwise the teacher runs online when `teacher` is given (no
    teacher at all for a method that reads none). With batch["view"] each example uses that
    augmented view, otherwise a fresh one per epoch.
    """
    seed, recipe, size = cfg["seed"], cfg["augment"], cfg["image_size"]
    signals_of = functools.partial(
        _signals, sparse_kind=cfg["soft_labels"], teacher=teacher, intermediate=intermediate
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, frozen: Frozen, batch, epoch):
        view = batch.get("view", epoch)
        keys = augment.example_keys(seed, batch["index"], view)
        images = augment.augment(
            batch["image"], keys, recipe, size, partner_images=batch.get("partner")
        )
        signals = signals_of(frozen, batch, images)

        def objective(params):
            model = nnx.merge(graphdef, params, state["rest"], copy=True)
            total, parts = loss_fn(
                model, images, labels=batch.get("label"), epoch=epoch, signals=signals
            )
            trainable = student_lib.trainable(model.student)
            return total, (parts, nnx.split(model, trainable, ...)[2])

        (total, (parts, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "rest": rest,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        # The loop stops on a non-finite loss term or gradient norm (read one step late).
        metrics = {"loss": total, **parts, "grad_norm": optax.tree.norm(grads)}
        return new_state, {**metrics, "lr": schedule(state["step"])}

    return train_step


def _signals(frozen: Frozen, batch, images, *, sparse_kind, teacher, intermediate) -> Signals:
    """The teachers' signals for a batch's augmented `images` (inside the jitted step)."""
    it_out = t = q = None
    if intermediate is not None:
        teacher_it = nnx.merge(intermediate, frozen.intermediate, copy=True)
        it_map, it_features = teacher_it.encode(images)
        it_logits = teacher_it.classifier(it_features)
        it_out = jax.lax.stop_gradient((it_map.astype(jnp.float32), it_logits))
    if "teacher_index" in batch:
        num_classes = frozen.anchors.shape[0]
        q = soft_labels.reconstruct(
            batch["teacher_index"], batch["teacher_value"], sparse_kind, num_classes
        )
    elif "teacher" in batch:
        t = batch["teacher"].astype(jnp.float32)
    elif teacher is not None:
        clip = nnx.merge(teacher, frozen.teacher, copy=True)
        t = jax.lax.stop_gradient(clip.encode_image(images)).astype(jnp.float32)
    return Signals(teacher=t, anchors=frozen.anchors, teacher_probs=q, intermediate=it_out)


def run(cfg: dict[str, Any], workdir: pathlib.Path, info) -> dict[str, Any]:
    """Trains (or resumes) the run; `info` is its dataset as the CLI resolved it."""
    stage = Stage.open("nsd", cfg, workdir, info)
    method = methods.get(cfg["method"])
    teachers = load_teachers(stage, method)
    anchors, learned = text_anchors(method, cfg, stage.info, teachers)
    classes = _anchor_classes(method, cfg, anchors)
    model = build_model(
        method, cfg, stage.info, teacher_dim=teachers.dim, dtype=stage.dtype, classes=classes
    )
    data = TrainingData.open(stage, method)
    tx, schedule = optimizer(cfg, data.steps_per_epoch)
    loss_fn = make_loss(
        method, cfg["loss"], learned_anchors=learned, num_epochs=cfg["epochs"], dataset=info.key
    )
    stage.claim()  # every check has passed
    cache = _teacher_cache(stage, method, teachers, anchors=anchors, source=data.source)
    graphdef, state = init_state(model, tx)
    step = _step(
        stage,
        teachers,
        anchors,
        cache,
        graphdef=graphdef,
        loss_fn=loss_fn,
        tx=tx,
        schedule=schedule,
    )
    task = loop.Task(
        "nsd",
        data.steps_per_epoch,
        cfg["batch_size"],
        data.batches(cache),
        step,
        _evaluator(stage, graphdef),
        _exporter(stage, graphdef),
    )
    summary = _summary(stage, method, teachers, data, cache=cache, learned=learned)
    summary["trainable_parameters"] = sum(x.size for x in jax.tree.leaves(state["params"]))
    return stage.fit(task, devices.replicate(stage.mesh, state), summary)


def _step(stage: Stage, teachers: Teachers, anchors, cache, *, graphdef, **step_args):
    """The loop's `(state, batch, epoch)` step: `make_train_step`'s with the frozen inputs on
    the mesh. A cached teacher's outputs come with the batches: it does not run in the step."""
    in_step = teachers if cache is None else dataclasses.replace(teachers, clip=None)
    frozen, graphdefs = _frozen(stage, in_step, anchors)
    train_step = make_train_step(stage.cfg, graphdef=graphdef, **step_args, **graphdefs)
    return lambda state, batch, epoch: train_step(state, frozen, batch, jnp.int32(epoch))


def _anchor_classes(method: methods.Method, cfg: dict[str, Any], anchors):
    """(anchors, scale s) of a student that classifies by the anchors (`Method.anchor_head`),
    else None."""
    head = method.anchor_head_for(clip_student.is_clip(cfg["student"]))
    return (anchors, head(cfg["loss"])) if head else None


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The training images (the training split, then any unlabelled ones) and their loader."""

    stage: Stage
    source: Any
    loader: pipeline.Loader
    steps_per_epoch: int
    reads_labels: bool
    view_of: Any  # (indices, epoch) -> the view each example trains on

    @classmethod
    def open(cls, stage: Stage, method: methods.Method) -> TrainingData:
        cfg = stage.cfg
        source = setup.train_source(stage.info, stage.train_split, cfg, stage.unlabeled)
        view_of = teacher_cache.example_views(cfg["seed"], cfg["teacher_cache"], len(source))
        loader = pipeline.Loader(
            source,
            global_batch_size=cfg["batch_size"],
            image_size=cfg["host_image_size"],
            resize="stretch",
            train=True,
            seed=cfg["seed"],
            cache_dir=stage.host_cache_dir(),
            partners=_partners(cfg, view_of, len(source)),
        )
        steps = setup.steps_per_epoch(loader.steps_per_epoch, cfg)
        return cls(stage, source, loader, steps, method.reads_labels, view_of)

    def batches(self, cache: teacher_cache.Cache | None):
        """(epoch, start step) -> the epoch's device batches from `start` on: images, labels
        (for a method that reads them: nothing else can), indices, the partners' images under
        "mixup", the cached view of each example and what the cache holds for it."""
        views, mesh = self.stage.cfg["teacher_cache"], self.stage.mesh
        keys = ["image", "index"] + ["label"] * self.reads_labels
        keys += ["partner"] * (self.loader.partners is not None)

        def batches(epoch, start):
            for b in itertools.islice(
                self.loader.epoch(epoch, start), self.steps_per_epoch - start
            ):
                b = {k: b[k] for k in keys}
                if views:
                    b["view"] = self.view_of(b["index"], epoch)
                if cache is not None:
                    b.update(cache.lookup(b["index"], b["view"]))
                yield devices.to_global(mesh, b)

        return batches


def _partners(cfg: dict[str, Any], view_of, num_examples: int):
    """The loader's (indices, epoch) -> partner indices under "mixup" (None otherwise): each
    example's partner at the view it trains on."""
    if cfg["augment"] != augment.MIXUP:
        return None
    seed = cfg["seed"]
    return lambda index, epoch: augment.partners(seed, index, view_of(index, epoch), num_examples)


def _teacher_cache(stage: Stage, method: methods.Method, teachers: Teachers, *, anchors, source):
    """The teacher cache of the run's views (built, or reused), or None: the teacher runs
    online, or the method reads none."""
    cfg = stage.cfg
    if teachers.clip is None or not cfg["teacher_cache"] or cfg["teacher_cache_online"]:
        return None
    spec = teacher_cache.Spec(
        teacher=teachers.clip_id,
        dataset=stage.info.key,
        split=stage.train_split,
        data_dir=str(cfg["data_dir"]),
        views=cfg["teacher_cache"],
        seed=cfg["seed"],
        recipe=cfg["augment"],
        host_image_size=cfg["host_image_size"],
        image_size=cfg["image_size"],
        compute_dtype=jnp.dtype(stage.dtype).name,
        dtype=cfg["teacher_cache_dtype"],
        soft_labels=sparse_labels(cfg, method, anchors),
    )
    return teacher_cache.build(
        teachers.clip,
        source,
        spec,
        batch_size=cfg["eval_batch_size"],
        mesh=stage.mesh,
        teacher_sharding=cfg["teacher_sharding"],
        path=pathlib.Path(cfg["teacher_cache_dir"] or stage.workdir / "teacher_cache"),
    )


def _frozen(stage: Stage, teachers: Teachers, anchors) -> tuple[Frozen, dict[str, Any]]:
    """The step's frozen inputs on the mesh, and the graphdefs of the teachers that run in it
    (`make_train_step`'s `teacher` and `intermediate`)."""
    split = [
        nnx.split(m) if m is not None else (None, None)
        for m in (teachers.clip, teachers.intermediate)
    ]
    (t_graphdef, t_state), (it_graphdef, it_state) = split
    mesh = stage.mesh
    frozen = Frozen(
        teacher=devices.place_frozen(mesh, t_state, stage.cfg["teacher_sharding"]),
        anchors=devices.replicate(mesh, None if anchors is None else jnp.asarray(anchors)),
        intermediate=devices.replicate(mesh, it_state),
    )
    return frozen, {"teacher": t_graphdef, "intermediate": it_graphdef}


def _evaluator(stage: Stage, graphdef):
    """state -> {"top1", "select"}: the student's test top-1, which also selects the best epoch."""
    cfg, size = stage.cfg, stage.cfg["image_size"]
    test_loader = stage.eval_loader(
        stage.info.test_split,
        size=size,
        resize="stretch",
        batch=cfg["eval_batch_size"],
        cached=True,
    )

    @jax.jit
    def predict(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        return jnp.argmax(model.student(augment.eval_transform(batch["image"], size)), -1)

    def evaluate(state):
        preds, labels = devices.run_over_split(
            lambda b: predict(state["params"], state["rest"], b),
            test_loader,
            stage.mesh,
            "evaluate",
        )
        top1 = float(np.mean(preds == labels))
        return {"top1": top1, "select": top1}

    return evaluate


def _exporter(stage: Stage, graphdef):
    """(state, scores) -> WORKDIR/student: the student of that state, its heads folded in."""

    def export_best(state, scores):
        # Every process takes part: orbax saves are collective (the primary writes).
        best = nnx.merge(graphdef, *jax.device_get((state["params"], state["rest"])))
        best.student.eval()
        student_lib.save_student(
            stage.workdir / "student",
            best.student.folded(),
            dataset=stage.info.key,
            class_names=list(stage.info.class_names),
            top1=scores["top1"],
            method=stage.cfg["method"],
            image_size=stage.cfg["image_size"],
        )

    return export_best


def _summary(stage: Stage, method, teachers: Teachers, data: TrainingData, *, cache, learned):
    """summary.json's Stage-NSD keys: what trained, on what, and its cost in teacher passes."""
    cfg = stage.cfg
    if teachers.intermediate is not None:
        # DAIT's passes are its intermediate teacher's: the CLIP teacher ran when that trained.
        mode, forwards = (
            method.teacher,
            setup.intermediate_teacher_forwards(cfg["intermediate_teacher"]),
        )
    elif teachers.clip is None:
        mode, forwards = method.teacher, 0
    elif cache is not None:  # the cache's views, however many runs share it
        mode, forwards = "cached", len(data.source) * cfg["teacher_cache"]
    else:  # one per image of every step
        mode, forwards = "online", cfg["epochs"] * data.steps_per_epoch * cfg["batch_size"]
    return {
        "method": cfg["method"],
        "student": cfg["student"],
        "teacher": teachers.clip_id,
        "train_examples": len(data.source),
        "unlabeled_examples": stage.n_unlabeled,
        "learned_anchors": learned,
        "no_psc": cfg["no_psc"],
        "loss": {k: cfg["loss"][k] for k in method.sections},
        "teacher_cache_views": cfg["teacher_cache"],
        "teacher_mode": mode,
        "teacher_forwards": forwards,
    }
