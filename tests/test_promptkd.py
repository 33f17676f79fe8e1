"""PromptKD end to end: the training labels are never read (a run with garbage labels is
bit-identical), a student trains from a folder of unlabelled images with a labelled test split
only, it deploys as a plain classifier, and bad input is one line."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import NSD_ARGS
from PIL import Image
from test_train import checkpoint_steps, latest_state

from pand_jax import methods
from pand_jax.data import sources


def cli(argv):
    from pand_jax.cli.train import main

    return main([str(a) for a in argv])


class GarbageLabels:
    """A source whose labels are replaced by others (a fixed permutation of the classes)."""

    def __init__(self, source, num_classes):
        self.source, self.name, self.num_classes = source, source.name, num_classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        ex = self.source[i]
        return {**ex, "label": (7 * ex["label"] + 3) % self.num_classes}


def _run(method, teacher, anchors, workdir, garbage, monkeypatch):
    from pand_jax.train import setup

    real = setup.load_split
    monkeypatch.setattr(
        setup,
        "load_split",
        lambda info, split, cfg: (
            GarbageLabels(real(info, split, cfg), info.num_classes)
            if garbage and split == info.train_split
            else real(info, split, cfg)
        ),
    )
    args = [a.replace("max_steps_per_epoch=1", "max_steps_per_epoch=2") for a in NSD_ARGS]
    assert (
        cli(
            args
            + ["--method", method, "--teacher", teacher, "--anchors", anchors, "--workdir", workdir]
        )
        == 0
    )
    monkeypatch.setattr(setup, "load_split", real)
    return latest_state(workdir)


def _same_arrays(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_training_labels_are_never_read(teacher, psc_run, tmp_path, monkeypatch):
    """The student is bit-identical when the training labels are garbage; KD, which reads them,
    is not (so the garbage reaches the trainer)."""
    anchors = psc_run / "anchors.npz"
    runs = {
        (m, g): _run(m, teacher, anchors, tmp_path / f"{m}-{g}", g, monkeypatch)
        for m in ("promptkd", "kd")
        for g in (False, True)
    }
    assert _same_arrays(runs["promptkd", False]["params"], runs["promptkd", True]["params"])
    assert _same_arrays(runs["promptkd", False]["rest"], runs["promptkd", True]["rest"])
    assert not _same_arrays(runs["kd", False]["params"], runs["kd", True]["params"])
    logged = [json.loads(line) for line in (tmp_path / "promptkd-False/metrics.jsonl").open()]
    steps = [r for r in logged if r["kind"] == "step"]
    assert steps and all("cls" not in r and np.isfinite(r["kd"]) for r in steps)


def _image(path: pathlib.Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(path)


@pytest.fixture()
def label_free(tmp_path):
    """A labelled test split only (3 classes of 2), and 12 unlabelled images in any layout."""
    rng = np.random.default_rng(0)
    for c in ("circle", "square", "triangle"):
        for k in range(2):
            _image(tmp_path / "shapes" / "test" / c / f"{k}.png", rng)
    for k in range(12):
        _image(tmp_path / "unlabeled" / ("a" if k % 2 else "b/c") / f"u{k}.PNG", rng)
    return tmp_path / "shapes", tmp_path / "unlabeled"


def _label_free_args(dataset, unlabeled, teacher, workdir):
    args = [a for a in NSD_ARGS]
    args[args.index("digits")] = f"folder:{dataset}"
    return args + [
        "--method",
        "promptkd",
        "--no-psc",
        "--unlabeled-data",
        f"folder:{unlabeled}",
        "--teacher",
        teacher,
        "--workdir",
        workdir,
    ]


def test_a_student_from_unlabelled_images_deploys_as_a_plain_classifier(
    teacher, label_free, tmp_path, capsys
):
    from test_deploy import _export_parity

    from pand_jax.deploy import student as student_lib

    dataset, unlabeled = label_free
    workdir = tmp_path / "run"
    assert cli(_label_free_args(dataset, unlabeled, teacher, workdir)) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["method"] == "promptkd" and summary["teacher_forwards"] == 8
    assert summary["train_examples"] == summary["unlabeled_examples"] == 12
    assert checkpoint_steps(workdir) == [1]
    trained = student_lib.load(workdir)
    assert trained.model.head_dim == 64 and trained.class_names == ["circle", "square", "triangle"]
    _export_parity(workdir, trained.model, ["circle", "square", "triangle"], 32, tmp_path, capsys)


def test_the_training_set_is_the_split_then_the_unlabelled_images(label_free):
    from pand_jax.data import folder, get_dataset
    from pand_jax.train import setup

    dataset, unlabeled = label_free
    info = get_dataset(f"folder:{dataset}")
    assert "train" not in info.tree.files and info.num_classes == 3
    images = folder.unlabeled_images(f"folder:{unlabeled}")
    assert [os.path.relpath(p, unlabeled) for p in images.paths[:2]] == ["a/u1.PNG", "a/u11.PNG"]
    cfg = {"data_dir": None, "skip_bad_images": False}
    only = setup.train_source(info, "train", cfg, images)
    assert len(only) == 12 and {only[i]["label"] for i in range(12)} == {-1}
    digits = get_dataset("digits")
    both = setup.train_source(digits, "train", cfg, images)
    n = len(sources.load_split(digits, "train"))
    assert isinstance(both, sources.ConcatSource) and len(both) == n + 12
    assert both[n]["label"] == -1 and both[n]["index"] == n and both[0]["label"] >= 0


@pytest.mark.parametrize(
    "change, extra, message",
    [
        (
            None,
            ["--method", "pand"],
            "config unlabeled_data = 'folder:UNLABELED': expected null with "
            "--method pand, which trains on labels (images without labels "
            "need a method that reads none: "
            f"{', '.join(methods.names(lambda m: not m.reads_labels))})",
        ),
        (
            lambda u: [p.unlink() for p in u.rglob("*.PNG")],
            [],
            "--unlabeled-data: no images under UNLABELED",
        ),
        (
            lambda u: (u / "a" / "u1.PNG").write_bytes(b"not a png"),
            [],
            "1 image file(s) under UNLABELED cannot be read; nothing was run",
        ),
    ],
)
def test_bad_label_free_input_is_one_line(
    teacher, label_free, tmp_path, capsys, change, extra, message
):
    dataset, unlabeled = label_free
    if change:
        change(unlabeled)
    assert cli(_label_free_args(dataset, unlabeled, teacher, tmp_path / "run") + extra) == 2
    err = capsys.readouterr().err
    assert message.replace("UNLABELED", str(unlabeled)) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_promptkd_without_anchors_and_without_a_train_split(teacher, label_free, tmp_path, capsys):
    dataset, unlabeled = label_free
    args = _label_free_args(dataset, unlabeled, teacher, tmp_path / "run")
    args.remove("--no-psc")
    assert cli(args) == 2
    assert "anchors file not found: runs/folder-shapes-" in capsys.readouterr().err
    args = _label_free_args(dataset, unlabeled, teacher, tmp_path / "run")
    i = args.index("--unlabeled-data")
    del args[i : i + 2]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (
        f"{dataset}/train is missing; expected {dataset}/train/<class>/<images> (or, for a "
        "method that reads no labels, images without labels from --unlabeled-data "
        "folder:DIR)"
    ) in err
