"""evaluate.py, predict.py and export.py on the trainer's digits student (conftest's `nsd_run`)
and on random students of both architectures."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import PSC_ARGS, REPO, run_train
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from pand_jax.cli import evaluate, export, predict
from pand_jax.data import augment, load_split
from pand_jax.models.student import ARCHS, Student, save_student

RANDOM_CLASSES = [f"class {c}" for c in "abcdefg"]
RANDOM_SIZE = 64
EXPORT_RTOL = 1e-5  # fp32 logits, relative to their largest magnitude


def cli(module, argv, capsys) -> tuple[int, str, str]:
    try:
        code = module.main(list(map(str, argv)))
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def make_random_student(
    arch: str, directory: pathlib.Path, head_dim: int | None = None
) -> tuple[pathlib.Path, Student]:
    """A random student, saved, whose BatchNorm statistics and affine parameters are random
    too, so a conversion that drops or transposes any of them shows. Drawn with NumPy into an
    abstract model (a random init in eager JAX takes ~20 s on a busy CPU). `head_dim`: an
    anchor head (PromptKD's) with random projector and class vectors."""
    model = nnx.eval_shape(
        lambda: Student(arch, len(RANDOM_CLASSES), head_dim=head_dim, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(2)

    def draw(path, w):
        if path[-1] == "kernel":  # He-scaled, so activations stay O(1) through the depth
            return rng.standard_normal(w.shape) * np.sqrt(2 / np.prod(w.shape[:-1]))
        if path[-1] == "var":
            return rng.uniform(0.5, 2.0, w.shape)
        return rng.standard_normal(w.shape) * 0.2 + (path[-1] == "scale")

    pure = flatten_dict(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(
        state, unflatten_dict({p: draw(p, w).astype(np.float32) for p, w in pure.items()})
    )
    model = nnx.merge(graphdef, state)
    model.eval()
    path = directory / "student"
    save_student(path, model, dataset=None, class_names=RANDOM_CLASSES, image_size=RANDOM_SIZE)
    return path, model


@pytest.fixture(scope="module")
def random_students(tmp_path_factory) -> dict[str, tuple[pathlib.Path, Student]]:
    students = {
        arch: make_random_student(arch, tmp_path_factory.mktemp(f"random-{arch}")) for arch in ARCHS
    }
    students["mobilenet_v2-anchor"] = make_random_student(
        "mobilenet_v2", tmp_path_factory.mktemp("random-anchor"), head_dim=24
    )
    return students


def flax_logits(model: Student, images_nhwc: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(nnx.jit(lambda m, x: m(x))(model, images_nhwc))


def relative_error(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def evaluation(nsd_run, psc_run, teacher, tmp_path_factory):
    """evaluate.py on the trained student's workdir, with the teacher and PSC's anchors."""
    out = tmp_path_factory.mktemp("eval")
    code = evaluate.main(
        list(
            map(
                str,
                [
                    "--student",
                    nsd_run,
                    "--dataset",
                    "digits",
                    "--out",
                    out,
                    "--teacher",
                    teacher,
                    "--anchors",
                    psc_run / "anchors.npz",
                ],
            )
        )
    )
    assert code == 0
    return out


def test_evaluate_top1_is_the_trainings_best_top1(evaluation, nsd_run):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    summary = json.loads((nsd_run / "summary.json").read_text())
    assert metrics["top1"] == summary["best_top1"]
    assert metrics["split"] == "test" and metrics["num_examples"] == len(
        load_split("digits", "test")
    )


def test_evaluate_metrics_match_sklearn(evaluation):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    with np.load(evaluation / "predictions.npz") as f:
        logits, labels = f["logits"], f["labels"]
    test = load_split("digits", "test")
    np.testing.assert_array_equal(labels, [test[i]["label"] for i in range(len(test))])
    classes = np.arange(10)
    assert metrics["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-12)
    assert metrics["top5"] == pytest.approx(
        top_k_accuracy_score(labels, logits, k=5, labels=classes), abs=1e-12
    )
    assert metrics["mean_per_class"] == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-12
    )
    with open(evaluation / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == [str(d) for d in range(10)]
    np.testing.assert_array_equal(
        [int(r["support"]) for r in rows], np.bincount(labels, minlength=10)
    )
    want = [np.mean(logits[labels == c].argmax(1) == c) for c in classes]
    np.testing.assert_allclose([float(r["accuracy"]) for r in rows], want, atol=1e-6)


def test_evaluate_teacher_with_anchors_matches_psc(evaluation, psc_run):
    """The teacher's top-1 with PSC's anchors is Stage-PSC's test top-1 (same features)."""
    metrics = json.loads((evaluation / "metrics.json").read_text())
    n = metrics["num_examples"]
    psc = json.loads((psc_run / "summary.json").read_text())
    assert round(metrics["teacher"]["top1"] * n) == round(psc["best_top1"] * n)
    with open(evaluation / "per_class.csv") as f:
        assert "teacher_accuracy" in next(csv.reader(f))


def test_evaluate_teacher_follows_psc_at_another_image_size(nsd_run, teacher, tmp_path):
    """A PSC run whose feature_image_size (64) is not the teacher's own (32) says so, and
    evaluate.py's teacher with its anchors sees the images as that run did: its top-1 is the
    run's (at the teacher's own size it is not: the features differ)."""
    workdir = tmp_path / "psc64"
    out = run_train(
        PSC_ARGS + ["--set", "feature_image_size=64", "--teacher", teacher, "--workdir", workdir]
    )
    notes = [line for line in out.stdout.splitlines() if line.startswith("note: the teacher")]
    assert notes == [
        "note: the teacher test-teacher was trained at 32 px; its features are "
        "computed at feature_image_size=64 px (--set feature_image_size=32 to "
        "follow the teacher)"
    ]
    report = tmp_path / "eval"
    assert (
        evaluate.main(
            list(
                map(
                    str,
                    [
                        "--student",
                        nsd_run,
                        "--dataset",
                        "digits",
                        "--out",
                        report,
                        "--teacher",
                        teacher,
                        "--anchors",
                        workdir / "anchors.npz",
                    ],
                )
            )
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    n = metrics["num_examples"]
    psc = json.loads((workdir / "summary.json").read_text())
    assert round(metrics["teacher"]["top1"] * n) == round(psc["best_top1"] * n)


def test_evaluate_figures(evaluation):
    for name, min_size in (("confusion.png", (700, 600)), ("mistakes.png", (800, 300))):
        with Image.open(evaluation / name) as img:
            assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], (name, img.size)
            # Not a blank canvas: a drawn figure has many distinct colours.
            assert len(np.unique(np.asarray(img.convert("L")))) > 20


@pytest.mark.parametrize("n", [3, 10])
def test_small_confusion_matrix_shows_counts_and_fills_its_canvas(n, tmp_path):
    from pand_jax.deploy import plots

    cm = np.random.default_rng(n).poisson(0.6, (n, n)) + 10 * np.eye(n, dtype=int)
    fig = plots.confusion_figure(cm, [f"class {c}" for c in range(n)])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(str(c) for c in cm.flat if c)
    fig.savefig(tmp_path / "c.png", dpi=110)
    with Image.open(tmp_path / "c.png") as img:
        blank = (np.asarray(img.convert("L")) >= 250).mean()
    assert blank < 0.5, blank  # the matrix, its labels and colour bar; earlier figures: 0.55


def test_evaluate_zero_shot_teacher_table(nsd_run, psc_run, teacher, tmp_path, capsys):
    code, out, _ = cli(
        evaluate,
        ["--student", nsd_run / "student", "--out", tmp_path, "--teacher", teacher],
        capsys,
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    n = metrics["num_examples"]
    psc = json.loads((psc_run / "summary.json").read_text())
    assert round(metrics["teacher"]["top1"] * n) == round(psc["zero_shot_top1"] * n)
    student_row = next(line for line in out.splitlines() if line.startswith("student"))
    assert f"{100 * metrics['top1']:.2f}%" in student_row
    assert metrics["anchors"] == "template"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--student", "{tmp}/nowhere", "--dataset", "digits"], "python train.py --stage nsd"),
        (["--student", "{random}", "--dataset", "nope"], "unknown dataset 'nope'"),
        (
            ["--student", "{random}", "--dataset", "digits"],
            "predicts 7 classes but dataset 'digits' has 10",
        ),
    ],
)
def test_evaluate_bad_input_is_one_line(argv, message, random_students, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, random=random_students["mobilenet_v2"][0]) for a in argv]
    code, _, err = cli(evaluate, argv + ["--out", tmp_path / "out"], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_export_bad_format_is_one_line(random_students, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "export.py"),
            "--student",
            random_students["resnet18"][0],
            "--format",
            "keras",
            "--out",
            tmp_path / "m.keras",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "invalid choice: 'keras'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _digit_files(folder: pathlib.Path, n: int) -> list[pathlib.Path]:
    """The first n digits test images as lossless PNGs (exactly what the evaluation reads)."""
    test = load_split("digits", "test")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(np.asarray(test[i]["image"])).save(paths[-1])
    return paths


def test_predict_lines_match_the_evaluation(evaluation, nsd_run, tmp_path, capsys):
    paths = _digit_files(tmp_path / "digits", 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    code, out, err = cli(
        predict, ["--student", nsd_run, "--top-k", "3", paths[0], bad, tmp_path / "digits"], capsys
    )
    assert code == 1
    assert str(bad) in err and "could not be read" in err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(map(str, [paths[0], *paths]))
    with np.load(evaluation / "predictions.npz") as f:
        logits = f["logits"][:3].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for line, p in zip(lines[1:], probs):
        entries = line.split("\t")[1].split(", ")
        want = np.argsort(-p, kind="stable")[:3]
        assert [e.split(" (")[0] for e in entries] == [str(c) for c in want]
        np.testing.assert_allclose(
            [float(e.split("(")[1].rstrip(")")) for e in entries], p[want], atol=2e-3
        )


def test_predict_json_exif_and_grey(random_students, tmp_path, capsys):
    """Any PIL format: a grey PNG, and a JPEG whose EXIF orientation rotates it upright."""
    from pand_jax.deploy.predict import read_image

    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30)).save(grey)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 30, 30)).save(rotated, exif=exif)
    assert read_image(rotated).shape == (40, 20, 3)
    assert read_image(grey).shape == (20, 30, 3)
    code, out, _ = cli(
        predict, ["--student", random_students["resnet18"][0], "--json", tmp_path], capsys
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(grey), str(rotated)]
    for r in records:
        assert len(r["top"]) == 5 and {t["class"] for t in r["top"]} <= set(RANDOM_CLASSES)
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) < 1


def test_predict_reads_a_16_bit_png_as_training_does(random_students, tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits (x / 257) by predict.py as by training's
    folder reader, not clipped at 255 (which turns it white), and predicted as its 8-bit copy."""
    from pand_jax.deploy import predict as predict_lib
    from pand_jax.deploy import student as student_lib

    wide = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    root = tmp_path / "wide"
    for split in ("train", "test"):  # the layout a folder dataset needs
        (root / split / "ramp").mkdir(parents=True)
        Image.fromarray(wide).save(root / split / "ramp" / "ramp16.png")
    png16 = root / "train" / "ramp" / "ramp16.png"
    with Image.open(png16) as f:
        assert f.mode == "I;16"  # the file really is 16-bit
    training = load_split(f"folder:{root}", "train", data_dir=str(tmp_path / "none"))[0]["image"]
    predicted = predict_lib.read_image(png16)
    np.testing.assert_array_equal(predicted, training)
    np.testing.assert_array_equal(predicted[..., 0], np.round(wide / 257.0))
    png8 = tmp_path / "ramp8.png"
    Image.fromarray(np.round(wide / 257.0).astype(np.uint8)).save(png8)
    student = student_lib.load(random_students["resnet18"][0])
    (p16, p8) = predict_lib.predict(student, [png16, png8], top_k=len(RANDOM_CLASSES))
    assert p16.error is None and p16.top == p8.top


def _check_sidecar(path: pathlib.Path, fmt: str, arch: str, classes: list[str], size: int) -> None:
    meta = json.loads(path.read_text())
    assert (
        meta["format"],
        meta["arch"],
        meta["num_classes"],
        meta["class_names"],
        meta["image_size"],
    ) == (fmt, arch, len(classes), classes, size)
    np.testing.assert_array_equal(meta["mean"], augment.CLIP_MEAN)
    np.testing.assert_array_equal(meta["std"], augment.CLIP_STD)
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["dtype"] == "float32"


def _export_parity(student_dir, model: Student, classes, size, tmp_path, capsys):
    """Both formats give the Flax logits at batch 1 and 5 (the batch axis is dynamic)."""
    import onnxruntime
    import torch

    from pand_jax.convert.torchvision import torchvision_student

    # Both formats into one folder: each keeps its own metadata file.
    out = tmp_path / "deploy"
    for fmt in ("torchvision", "onnx"):
        code, _, err = cli(
            export, ["--student", student_dir, "--format", fmt, "--out", out], capsys
        )
        assert code == 0, err
    tv = torchvision_student(model.arch, len(classes), model.head_dim)
    tv.load_state_dict(torch.load(out / "student.pt"))  # strict
    session = onnxruntime.InferenceSession(
        str(out / "student.onnx"), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 5):
        images = np.random.default_rng(3).standard_normal((batch, size, size, 3)).astype(np.float32)
        want = flax_logits(model, images)
        nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        with torch.no_grad():
            got = tv.eval()(torch.from_numpy(nchw)).numpy()
        assert relative_error(got, want) <= EXPORT_RTOL, ("torchvision", batch)
        got = session.run(["logits"], {"image": nchw})[0]
        assert relative_error(got, want) <= EXPORT_RTOL, ("onnx", batch)
    _check_sidecar(out / "student.pt.json", "torchvision", model.arch, classes, size)
    _check_sidecar(out / "student.onnx.json", "onnx", model.arch, classes, size)


def test_export_out_is_a_folder_or_a_model_file():
    from pand_jax.deploy.export import model_path

    assert model_path("deploy", "onnx") == pathlib.Path("deploy/student.onnx")
    assert model_path("deploy", "torchvision") == pathlib.Path("deploy/student.pt")
    assert model_path("m/birds.pt", "torchvision") == pathlib.Path("m/birds.pt")  # as before
    assert model_path("m/birds.onnx", "onnx") == pathlib.Path("m/birds.onnx")


@pytest.mark.parametrize("arch", [*ARCHS, "mobilenet_v2-anchor"])
def test_export_random_students_match_flax(arch, random_students, tmp_path, capsys):
    path, model = random_students[arch]
    _export_parity(path, model, RANDOM_CLASSES, RANDOM_SIZE, tmp_path, capsys)


def test_export_trained_student_matches_flax(nsd_run, tmp_path, capsys):
    from pand_jax.deploy import student as student_lib

    trained = student_lib.load(nsd_run)
    assert trained.image_size == 32
    _export_parity(nsd_run, trained.model, [str(d) for d in range(10)], 32, tmp_path, capsys)
