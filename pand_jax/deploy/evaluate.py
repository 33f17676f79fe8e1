"""Evaluating a trained student (and optionally the CLIP teacher) on a dataset split.

The student sees Stage-NSD's evaluation transform (stretch to the student's image size, CLIP
normalisation), with its recorded batch size and compute dtype, so its top-1 is the `best_top1`
training reported. The teacher sees Stage-PSC's feature transform (shorter side resized, center
crop; with learned anchors at the image size and dtype their PSC run recorded, zero-shot at the
tower's own size) and classifies by cosine similarity to text anchors: learned ones from
Stage-PSC, or the dataset's prompt template (zero-shot).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from pand_jax import anchors as anchors_lib
from pand_jax import data as data_lib
from pand_jax import devices, losses, prompts
from pand_jax.data import augment, pipeline
from pand_jax.deploy import plots
from pand_jax.deploy import student as student_lib
from pand_jax.models.clip import load_clip

TOP_K = 5


def split_loader(info, split: str, *, size: int, resize: str, batch: int, settings):
    """(source, in-order loader) of a split, as the trainer's evaluation reads it."""
    source = data_lib.load_split(info.key, split, settings["data_dir"], settings["skip_bad_images"])
    return source, pipeline.Loader(
        source, global_batch_size=batch, image_size=size, resize=resize, train=False
    )


def teacher_logits(
    teacher: str, anchors: str | None, info, split: str, *, settings, batch: int, mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) of the CLIP teacher: CLIP's logit scale times the cosine
    similarity of image features and text anchors. With Stage-PSC's anchors the features are
    computed with the image size, resize and compute dtype that run recorded in them, so the
    top-1 is the one it reported; zero-shot, at the tower's own image size. The similarities
    are float32 NumPy, as PSC's zero-shot score."""
    text, meta = anchors_lib.load(anchors, info) if anchors else (None, {})
    recorded = meta.get("features")
    if anchors and recorded is None:
        print(
            f"warning: {anchors} does not record the settings of its teacher features (an "
            "older Stage-PSC wrote it); the teacher sees its own image size, which may not "
            "give the accuracy Stage-PSC reported",
            flush=True,
        )
    clip = load_clip(
        teacher, dtype=devices.compute_dtype(recorded["dtype"] if recorded else "auto")
    )
    if text is None:
        text = prompts.template_anchors(clip, info.class_names, info.prompt_template)
    size = recorded["image_size"] if recorded else clip.config.vision.image_size
    clip.check_image_size(size, "the anchors' feature image size")
    resize = recorded["resize"] if recorded else "shorter_center_crop"
    _, loader = split_loader(info, split, size=size, resize=resize, batch=batch, settings=settings)
    encode = devices.jit_apply(
        clip,
        lambda m, b: losses.l2_normalize(m.encode_image(augment.eval_transform(b["image"], size))),
        mesh,
    )
    features, labels = devices.run_over_split(encode, loader, mesh, "teacher")
    scale = np.exp(np.float32(clip.logit_scale[...]))
    return scale * (features.astype(np.float32) @ text.T), labels


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows true classes, columns predicted ones."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """top-1, top-5 and mean per-class accuracy (over the classes present in the split), with
    the per-class support and accuracy."""
    num_classes = logits.shape[1]
    k = min(TOP_K, num_classes)
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    cm = confusion_matrix(top_k[:, 0], labels, num_classes)
    support = cm.sum(1)
    per_class = np.diag(cm) / np.maximum(support, 1)
    return {
        "top1": float(np.mean(top_k[:, 0] == labels)),
        f"top{TOP_K}": float(np.mean(np.any(top_k == labels[:, None], axis=1))),
        "mean_per_class": float(np.mean(per_class[support > 0])),
        "support": support,
        "per_class": per_class,
        "confusion": cm,
    }


SUMMARY_KEYS = ("top1", f"top{TOP_K}", "mean_per_class")


def write_report(
    out: pathlib.Path,
    class_names,
    scores: dict[str, dict],
    header: dict[str, Any],
    *,
    logits: np.ndarray,
    labels: np.ndarray,
    source,
) -> None:
    """metrics.json, per_class.csv, predictions.npz, confusion.png and mistakes.png of the student
    (`scores["student"]`), plus the teacher's figures in metrics.json and per_class.csv."""
    out.mkdir(parents=True, exist_ok=True)
    student = scores["student"]
    report = {**header, **{k: student[k] for k in SUMMARY_KEYS}}
    if "teacher" in scores:
        report["teacher"] = {k: scores["teacher"][k] for k in SUMMARY_KEYS}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["class", "support", "accuracy", *(["teacher_accuracy"] if "teacher" in scores else [])]
        )
        for c, name in enumerate(class_names):
            w.writerow(
                [
                    name,
                    int(student["support"][c]),
                    f"{student['per_class'][c]:.6f}",
                    *([f"{scores['teacher']['per_class'][c]:.6f}"] if "teacher" in scores else []),
                ]
            )
    np.savez(out / "predictions.npz", logits=logits, labels=labels)
    plots.confusion(student["confusion"], class_names, out / "confusion.png")
    plots.mistakes(logits, labels, class_names, source, path=out / "mistakes.png")


def table(scores: dict[str, dict]) -> str:
    rows = [f"{'model':<8} {'top-1':>7} {'top-5':>7} {'mean/class':>11}"]
    for name, s in scores.items():
        rows.append(
            f"{name:<8} {100 * s['top1']:6.2f}% {100 * s[f'top{TOP_K}']:6.2f}% "
            f"{100 * s['mean_per_class']:10.2f}%"
        )
    return "\n".join(rows)


def evaluate(
    student_dir: str,
    dataset: str | None,
    split: str | None,
    out: pathlib.Path,
    *,
    data_dir: str | None = None,
    batch_size: int | None = None,
    teacher: str | None = None,
    anchors: str | None = None,
) -> dict[str, dict]:
    """Evaluates the student (and the teacher when given) and writes the report to `out`."""
    student = student_lib.load(student_dir)
    settings = dict(student.settings, **({"data_dir": data_dir} if data_dir else {}))
    info = data_lib.get_dataset(dataset or student.meta.get("dataset") or "")
    if settings["prompt_template"]:  # the one the training run used
        info = dataclasses.replace(info, prompt_template=settings["prompt_template"])
    student_lib.check_classes(student, info)
    split = split or info.test_split
    batch = batch_size or settings["eval_batch_size"]
    mesh = devices.make_mesh()
    # The one batch size no config schema has checked (--batch-size, or a run's on other devices).
    devices.check_batch_size(batch, mesh, "evaluation batch size")
    source, loader = split_loader(
        info, split, size=student.image_size, resize="stretch", batch=batch, settings=settings
    )
    logits, labels = devices.run_over_split(
        student_lib.logits_fn(student, mesh), loader, mesh, "student"
    )
    scores = {"student": metrics(logits, labels)}
    header = {
        "dataset": info.key,
        "split": split,
        "num_examples": int(len(labels)),
        "student": str(student_dir),
    }
    if teacher:
        teacher_scores, _ = teacher_logits(
            teacher, anchors, info, split, settings=settings, batch=batch, mesh=mesh
        )
        scores["teacher"] = metrics(teacher_scores, labels)
        header.update(teacher_path=str(teacher), anchors=str(anchors) if anchors else "template")
    if jax.process_index() == 0:
        write_report(
            out,
            student.class_names,
            scores,
            header,
            logits=logits,
            labels=labels,
            source=source,
        )
    return scores
