"""A CLIP image tower as the student (`--student clip:DIR`): VPT-deep prompts against open_clip's
own tower with the prompts inserted by hooks, only the prompts train by default, and the
trained student evaluates, predicts and exports (ONNX, PyTorch) like a CNN one.

Tolerances: fp32, matmul precision "highest", relative to the reference's largest magnitude:
1e-5 for the tower against open_clip (measured about 3e-7 on the demo ViTs), 1e-5 for ONNX and
PyTorch exports against the JAX student (measured 3e-7).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import NSD_ARGS
from flax import nnx
from helpers import classes_info, cli_error, max_rel, random_open_clip

from pand_jax import methods, prompts
from pand_jax.convert import open_clip as oc
from pand_jax.convert.open_clip import config_from_open_clip
from pand_jax.models import clip_student
from pand_jax.models.clip import CLIP, save_clip
from pand_jax.train import demo, nsd

TOL = 1e-5


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def torch_prompted(visual, images, prompts_):
    """open_clip's VisionTransformer.forward with VPT-deep prompts put in by forward hooks:
    prompts[0] appended to ln_pre's input, prompts[i] replacing the last n tokens before
    resblock i (1 <= i < D)."""
    depth, n = prompts_.shape[:2]

    def expand(p, x):
        return p.expand(x.shape[0], -1, -1)

    hooks = [
        visual.ln_pre.register_forward_pre_hook(
            lambda m, args: (torch.cat([args[0], expand(prompts_[0], args[0])], dim=1),)
        )
    ]
    for i in range(1, depth):

        def replace(m, args, kwargs, p=prompts_[i]):
            x = args[0]
            return (torch.cat([x[:, :-n], expand(p, x)], dim=1), *args[1:]), kwargs

        hooks.append(
            visual.transformer.resblocks[i].register_forward_pre_hook(replace, with_kwargs=True)
        )
    try:
        with torch.no_grad():
            return visual(images).numpy()
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["pand_demo_vit", "pand_demo_vit_quickgelu"])
def test_vpt_deep_matches_open_clip_with_hooked_prompts(name):
    torch_model, sd = random_open_clip(name, seed=3)
    model = oc.convert_state_dict(sd, config_from_open_clip(name))
    v = model.config.vision
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, v.image_size, v.image_size, 3), dtype=np.float32)
    # Compiled whole (eagerly, each small op of the tower would compile on its own).
    prompted = nnx.jit(lambda m, x, p: (m(x, p), m.tokens(x, p)))
    for depth in range(1, v.layers + 1):
        p = rng.standard_normal((depth, 4, v.width), dtype=np.float32)
        want = torch_prompted(
            torch_model.visual, torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(p)
        )
        got, tokens = prompted(model.visual, jnp.asarray(images), jnp.asarray(p))
        assert max_rel(got, want) < TOL, (depth, max_rel(got, want))
        assert tokens.shape == (3, 1 + v.grid**2 + 4, v.width)
    # Prompts change the embedding: the comparison above is not of two unprompted towers.
    assert max_rel(nnx.jit(lambda m, x: m(x))(model.visual, jnp.asarray(images)), want) > 1e-2


# ----------------------------------------------------------------------- the student in a run


@pytest.fixture(scope="module")
def vit_clip(tmp_path_factory) -> pathlib.Path:
    """The demo's ViT CLIP architecture (2 layers, 32 px), random weights."""
    path = tmp_path_factory.mktemp("clip_student")
    cfg = demo.teacher_config(demo.teacher_section(demo.demo_config(), "vit"))
    save_clip(path, CLIP(cfg, rngs=nnx.Rngs(1)), teacher_id="test-clip-student")
    return path


def _cfg(vit_clip, **sets):
    from pand_jax import config as config_lib

    cfg = config_lib.default_config("nsd")
    cfg.update(student=f"clip:{vit_clip}", image_size=32, student_prompt_depth=2, seed=0, **sets)
    return cfg


@pytest.mark.parametrize("train,context", [("prompts", 0), ("all", 0), ("prompts", 3)])
def test_what_trains(vit_clip, train, context):
    """prompts: the optimiser sees the prompts only (the tower rides in the frozen rest);
    all: the tower too; a text context trains, its text tower never. The class vectors never
    train."""
    import optax

    cfg = _cfg(vit_clip, student_train=train, student_text_context=context)
    model = nsd.build_model(
        methods.get("none"), cfg, classes_info(10), teacher_dim=None, dtype=jnp.float32
    )
    _, state = nsd.init_state(model, optax.sgd(0.1))
    trained = {
        jax.tree_util.keystr(k)
        for k, _ in jax.tree.leaves_with_path(nnx.to_pure_dict(state["params"]))
    }
    assert "['student']['prompts']" in trained
    tower = {k for k in trained if k.startswith("['student']['visual']")}
    assert (len(tower) > 0) == (train == "all"), sorted(trained)
    assert not any("classes" in k or "['text']" in k for k in trained), sorted(trained)
    n_tower = sum(x.size for x in jax.tree.leaves(nnx.state(model.student.visual, nnx.Param)))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert n_params == 2 * 4 * 64 + (n_tower if train == "all" else 0) + context * 64


def _tokens(clip, texts):
    return jnp.asarray(
        prompts.cut_after_eot(prompts.tokenize(texts, clip.config.text.context_length))
    )


def test_text_context_is_coop_on_the_students_text_tower(vit_clip, tmp_path):
    """With the context set to the placeholder token's embedding, the class vectors are the
    text tower's features of the plain prompts 'X X X <template>' (its ordinary token path);
    folding them into the head and exporting keep the logits."""
    import onnxruntime as ort

    from pand_jax.deploy import export as export_lib
    from pand_jax.deploy.student import TrainedStudent
    from pand_jax.models.clip import load_clip

    info = classes_info(10)
    model = nsd.build_model(
        methods.get("none"),
        _cfg(vit_clip, student_text_context=3),
        info,
        teacher_dim=None,
        dtype=jnp.float32,
    ).student
    clip = load_clip(vit_clip)
    x_token = _tokens(clip, [prompts.PLACEHOLDER])[0, 1]
    model.text_context.context[...] = jnp.broadcast_to(
        clip.text.token_embedding[...][x_token], (3, clip.config.text.width)
    )
    texts = prompts.context_prompts(info.class_names, info.prompt_template, 3)
    want = np.asarray(clip.encode_text(_tokens(clip, texts)))
    scale = float(np.exp(np.asarray(clip.logit_scale[...])))
    want = scale * (want / np.linalg.norm(want, axis=1, keepdims=True)).T
    np.testing.assert_allclose(np.asarray(model.class_vectors()), want, rtol=1e-5, atol=1e-5)

    model.text_context.context[...] = jnp.asarray(  # a learned-looking context
        np.random.default_rng(4).standard_normal((3, clip.config.text.width), np.float32)
    )
    model.eval()
    images = np.random.default_rng(5).standard_normal((3, 32, 32, 3), dtype=np.float32)
    logits = np.asarray(model(jnp.asarray(images)))
    folded = model.folded()
    assert folded.text is None and "text" not in json.dumps(folded.config())
    assert max_rel(folded(jnp.asarray(images)), logits) < TOL
    onnx, _ = export_lib.export(TrainedStudent(folded, {}, {"image_size": 32}), "onnx", tmp_path)
    got = ort.InferenceSession(str(onnx)).run(None, {"image": images.transpose(0, 3, 1, 2)})[0]
    assert max_rel(got, logits) < TOL


def test_classes_are_the_clips_own_text_features(vit_clip):
    from pand_jax.models.clip import load_clip

    info = classes_info(10)
    model = nsd.build_model(
        methods.get("none"), _cfg(vit_clip), info, teacher_dim=None, dtype=jnp.float32
    )
    clip = load_clip(vit_clip)
    text = prompts.template_anchors(clip, info.class_names, info.prompt_template)
    scale = float(np.exp(np.asarray(clip.logit_scale[...])))
    np.testing.assert_allclose(
        np.asarray(model.student.classifier.classes[...]), scale * text.T, rtol=1e-6, atol=1e-6
    )
    # logits = s cos(image, class text): CLIP's zero-shot classifier on the prompted tower
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32))
    model.eval()
    f = np.asarray(model.student.features(images))
    want = scale * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ text.T
    np.testing.assert_allclose(np.asarray(model.student(images)), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def clip_run(vit_clip, tmp_path_factory) -> pathlib.Path:
    from pand_jax.cli.train import main

    workdir = tmp_path_factory.mktemp("clip_run")
    args = [a.replace("max_steps_per_epoch=1", "max_steps_per_epoch=2") for a in NSD_ARGS]
    assert (
        main(
            args
            + [
                "--method",
                "none",
                "--student",
                f"clip:{vit_clip}",
                "--set",
                "student_prompt_depth=2",
                "--workdir",
                str(workdir),
            ]
        )
        == 0
    )
    return workdir


def test_a_run_trains_the_prompts_and_keeps_the_tower(vit_clip, clip_run):
    from pand_jax.deploy import student as student_lib
    from pand_jax.models.clip import load_clip

    trained = student_lib.load(clip_run).model
    assert isinstance(trained, clip_student.CLIPStudent)
    clip = load_clip(vit_clip)
    for (path, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(trained.visual)),
        nnx.to_flat_state(nnx.state(clip.visual)),
        strict=True,
    ):
        assert np.array_equal(np.asarray(got[...]), np.asarray(want[...])), path
    init = clip_student.CLIPStudent(
        clip.config.vision,
        clip.config.embed_dim,
        10,
        prompt_tokens=4,
        prompt_depth=2,
        rngs=nnx.Rngs(0),
    )
    moved = np.abs(np.asarray(trained.prompts[...]) - np.asarray(init.prompts[...])).max()
    assert moved > 1e-6  # two AdamW steps of lr 1e-4 move each prompt entry by up to 2e-4
    summary = json.loads((clip_run / "summary.json").read_text())
    assert summary["student"] == f"clip:{vit_clip}"


def test_a_run_with_a_text_context_saves_its_class_vectors_folded(vit_clip, tmp_path):
    from pand_jax.cli.train import main
    from pand_jax.deploy import student as student_lib

    assert (
        main(
            NSD_ARGS
            + [
                "--method",
                "none",
                "--student",
                f"clip:{vit_clip}",
                "--set",
                "student_prompt_depth=2",
                "--set",
                "student_text_context=2",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    saved = student_lib.load(tmp_path / "w").model
    assert saved.text is None and saved.text_context is None
    # CoOp's class vectors from a random context, not the template's
    from pand_jax.data.datasets import get_dataset

    template = nsd.build_model(
        methods.get("none"),
        _cfg(vit_clip),
        get_dataset("digits"),
        teacher_dim=None,
        dtype=jnp.float32,
    ).student.classifier.classes[...]
    assert saved.classifier.classes.shape == template.shape
    assert max_rel(saved.classifier.classes[...], template) > 1e-2


def test_evaluate_predict_and_exports_match_the_student(clip_run, tmp_path):
    import onnxruntime as ort

    from pand_jax.cli.evaluate import main as evaluate
    from pand_jax.deploy import export as export_lib
    from pand_jax.deploy import student as student_lib

    student = student_lib.load(clip_run)
    summary = json.loads((clip_run / "summary.json").read_text())
    assert (
        evaluate(["--student", str(clip_run), "--dataset", "digits", "--out", str(tmp_path / "ev")])
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(summary["best_top1"], abs=1e-12)

    images = np.random.default_rng(2).standard_normal((3, 32, 32, 3), dtype=np.float32)
    want = np.asarray(student.model(jnp.asarray(images)))
    onnx, sidecar = export_lib.export(student, "onnx", tmp_path / "x")
    got = ort.InferenceSession(str(onnx)).run(None, {"image": images.transpose(0, 3, 1, 2)})[0]
    assert max_rel(got, want) < TOL
    meta = json.loads(sidecar.read_text())
    assert meta["arch"] == "clip" and meta["clip_student"]["prompt_depth"] == 2
    pt, _ = export_lib.export(student, "torchvision", tmp_path / "x")
    module = export_lib.torchvision_model(student)
    module.load_state_dict(torch.load(pt))  # strict: every key the module has
    with torch.no_grad():
        assert max_rel(module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy(), want) < TOL


def test_promptkd_with_a_clip_student_exports_its_anchor_head(teacher, psc_run, vit_clip, tmp_path):
    """PromptKD's original setting: a CLIP student distilled through the projector onto the
    teacher's class vectors; the export folds them in."""
    import onnxruntime as ort

    from pand_jax.cli.train import main
    from pand_jax.deploy import export as export_lib
    from pand_jax.deploy import student as student_lib

    assert (
        main(
            NSD_ARGS
            + [
                "--method",
                "promptkd",
                "--teacher",
                str(teacher),
                "--anchors",
                str(psc_run / "anchors.npz"),
                "--student",
                f"clip:{vit_clip}",
                "--set",
                "student_prompt_depth=2",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    student = student_lib.load(tmp_path / "w")
    assert student.model.head_dim == 64  # the teacher's embedding width
    anchors = np.load(psc_run / "anchors.npz")["anchors"]
    np.testing.assert_allclose(
        np.asarray(student.model.classifier.classes[...]), 100.0 * anchors.T, rtol=1e-6, atol=1e-6
    )
    images = np.random.default_rng(3).standard_normal((4, 32, 32, 3), dtype=np.float32)
    want = np.asarray(student.model(jnp.asarray(images)))
    onnx, _ = export_lib.export(student, "onnx", tmp_path / "x")
    got = ort.InferenceSession(str(onnx)).run(None, {"image": images.transpose(0, 3, 1, 2)})[0]
    assert max_rel(got, want) < TOL


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def convnext_clip(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("convnext_clip")
    cfg = demo.teacher_config(demo.demo_config()["teacher"])
    save_clip(path, CLIP(cfg, rngs=nnx.Rngs(0)), teacher_id="test-convnext")
    return path


@pytest.mark.parametrize("case", ["convnext", "size", "depth", "missing", "train", "context"])
def test_bad_clip_students_are_one_line(case, vit_clip, convnext_clip, tmp_path, capsys):
    from pand_jax.cli.train import main

    student, sets, expect = {
        "convnext": (
            convnext_clip,
            [],
            "has a convnext image tower; a CLIP student needs a ViT one",
        ),
        "size": (
            vit_clip,
            ["image_size=24"],
            "image_size 24 px does not fit the ViT image tower: it takes 32 px only",
        ),
        "depth": (
            vit_clip,
            ["student_prompt_depth=3"],
            "student_prompt_depth = 3: expected 1 .. 2",
        ),
        "missing": (tmp_path / "nothing", [], "python convert_weights.py --model ViT-B-16"),
        "train": (
            vit_clip,
            ["student_train=head"],
            "student_train = 'head': expected one of ['prompts', 'all']",
        ),
        "context": (
            vit_clip,
            ["student_text_context=4"],
            "student_text_context = 4: expected 0 with --method promptkd, which ",
        ),
    }[case]
    method = "promptkd" if case == "context" else "none"
    args = list(NSD_ARGS) + [
        "--method",
        method,
        "--student",
        f"clip:{student}",
        "--workdir",
        str(tmp_path / "w"),
    ]
    for s in sets:
        if s.startswith("image_size"):
            args[args.index("image_size=32")] = s
        else:
            args += ["--set", s]
    assert main(args) == 2
    assert expect in cli_error(capsys)
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_fdbpl_with_a_clip_student_trains_dual_prompts(teacher, psc_run, vit_clip, tmp_path):
    """FDBPL's released setting: positive and negative contexts on the student's text tower,
    starting as "a photo of a" / "a photo of no" (so at step 0 the positive class vectors are
    the text tower's features of "a photo of a <class>."), both trained with the prompts; the
    negative path's terms reach the loss, L_casc is zero, and the saved student keeps only
    the positive class vectors, folded."""
    from pand_jax import config as config_lib
    from pand_jax.cli.train import main
    from pand_jax.data.datasets import get_dataset
    from pand_jax.deploy import student as student_lib
    from pand_jax.models.clip import load_clip

    info = get_dataset("digits")
    cfg = _cfg(vit_clip, method="fdbpl")
    model = nsd.build_model(
        methods.get("fdbpl"), cfg, info, teacher_dim=64, dtype=jnp.float32
    ).student
    clip = load_clip(vit_clip)
    f = config_lib.default_config("nsd")["loss"]["fdbpl"]
    for context, words in (
        (model.text_context, f["positive_init"]),
        (model.negative_context, f["negative_init"]),
    ):
        want = np.asarray(
            clip.encode_text(_tokens(clip, [f"{words} {name}." for name in info.class_names]))
        )
        want = (want / np.linalg.norm(want, axis=1, keepdims=True)).T
        got = np.asarray(context.class_vectors(model.text)) / float(context.scale[...])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    args = [a.replace("max_steps_per_epoch=1", "max_steps_per_epoch=2") for a in NSD_ARGS]
    assert (
        main(
            args
            + [
                "--method",
                "fdbpl",
                "--teacher",
                str(teacher),
                "--anchors",
                str(psc_run / "anchors.npz"),
                "--student",
                f"clip:{vit_clip}",
                "--set",
                "student_prompt_depth=2",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    steps = [
        json.loads(line)
        for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
        if '"step"' in line and '"kind": "step"' in line
    ]
    assert steps and all(abs(s["cascade"]) < 1e-6 for s in steps)
    assert all(s["negative_entropy"] < 0 and -1 <= s["cosine"] <= 1 for s in steps)
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["trainable_parameters"] == 2 * 4 * 64 + 2 * 4 * 64  # prompts, 2 contexts
    saved = student_lib.load(tmp_path / "w").model
    assert saved.text is None and saved.text_context is None and saved.negative_context is None
    assert saved.head_dim is None  # its own prompts, not PromptKD's projector


# ------------------------------------------------------------------ the CLIP-student recipes


def test_sgd_with_warmup_follows_torch():
    """optimizer.name=sgd with a constant warm-up then the cosine (the recipes' optimiser)
    against torch.optim.SGD(momentum, weight_decay) under the same per-step rates: 3 epochs of
    4 steps, the first at warmup_lr."""
    from pand_jax import config as config_lib

    cfg = config_lib.default_config("nsd")
    cfg["epochs"] = 3
    cfg["optimizer"].update(
        name="sgd",
        lr=0.05,
        end_lr=0.0,
        momentum=0.9,
        weight_decay=5e-3,
        warmup_epochs=1,
        warmup_lr=1e-3,
    )
    spe, o = 4, cfg["optimizer"]
    tx, schedule = nsd.optimizer(cfg, spe)
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = rng.standard_normal((12, 5, 3)).astype(np.float32)

    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([w], lr=1.0, momentum=0.9, weight_decay=5e-3)
    decay = 2 * spe  # the cosine runs over the epochs after the warm-up

    def rate(step):
        if step < spe:
            return o["warmup_lr"]
        return 0.5 * o["lr"] * (1 + np.cos(np.pi * (step - spe) / decay))

    params, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for step, g in enumerate(grads):
        assert float(schedule(step)) == pytest.approx(rate(step), rel=1e-5)  # fp32 cosine
        for group in opt.param_groups:
            group["lr"] = rate(step)
        w.grad = torch.from_numpy(g.copy())
        opt.step()
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = params + updates
    assert max_rel(params, w.detach().numpy()) < 1e-5


def test_a_recipe_sets_its_values_under_the_flags(tmp_path, capsys):
    from pand_jax.cli.train import main, parser, resolve

    args = parser().parse_args(
        [
            "--stage",
            "nsd",
            "--dataset",
            "digits",
            "--recipe",
            "promptkd_clip",
            "--epochs",
            "3",
            "--set",
            "optimizer.lr=0.01",
        ]
    )
    cfg, _, _ = resolve(args)
    recipe = json.loads(
        (
            pathlib.Path(__file__).parents[1] / "configs" / "recipes" / "promptkd_clip.json"
        ).read_text()
    )
    assert cfg["method"] == "promptkd" and cfg["optimizer"]["name"] == "sgd"
    assert cfg["student_prompt_depth"] == recipe["student_prompt_depth"] == 9
    assert cfg["optimizer"]["warmup_epochs"] == 1 and cfg["batch_size"] == 8
    assert cfg["epochs"] == 3 and cfg["optimizer"]["lr"] == 0.01  # the flags win
    assert (
        main(
            [
                "--stage",
                "nsd",
                "--dataset",
                "digits",
                "--recipe",
                "nope",
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 2
    )
    assert "unknown recipe 'nope'; expected one of ['fdbpl_clip', 'promptkd_clip']" in cli_error(
        capsys
    )
