"""Classifying image files with a trained student, through the same transform as its evaluation."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image

from pand_jax.data import images as images_lib
from pand_jax.deploy import student as student_lib
from pand_jax.progress import progress_bar

BATCH = 32


class Prediction(NamedTuple):
    path: str
    top: list[tuple[str, float]] | None  # (class name, probability), best first
    error: str | None


def expand(paths) -> list[pathlib.Path]:
    """Files as given; folders replaced by their files with an extension PIL knows (recursively,
    sorted). A path that does not exist is kept so that it is reported."""
    known = {ext.lower() for ext in Image.registered_extensions()}
    out = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in known)
        else:
            out.append(p)
    return out


def read_image(path: pathlib.Path) -> np.ndarray:
    """uint8 RGB [H, W, 3], decoded as training decodes it (`images.read_rgb`: upright by its
    EXIF orientation, 16-bit and float images scaled, not clipped)."""
    return np.asarray(images_lib.read_rgb(str(path)))


def predict(student: student_lib.TrainedStudent, paths, top_k: int) -> Iterator[Prediction]:
    """One Prediction per file, in order; unreadable files come back with `error` set."""
    logits_of = student_lib.logits_fn(student)
    names, size = student.class_names, student.image_size
    k = min(top_k, len(names))
    paths = list(paths)
    for lo in progress_bar(iterable=range(0, len(paths), BATCH), desc="predict", unit="batch"):
        images, done = [], []
        for p in paths[lo : lo + BATCH]:
            try:
                images.append(student_lib.resize(read_image(p), size))
                done.append((p, None))
            except images_lib.READ_ERRORS as e:  # reported; the other files are still predicted
                done.append((p, f"{type(e).__name__}: {e}"))
        probs = iter(_probabilities(logits_of, images))
        for p, error in done:
            if error:
                yield Prediction(str(p), None, error)
                continue
            row = next(probs)
            best = np.argsort(-row, kind="stable")[:k]
            yield Prediction(str(p), [(names[c], float(row[c])) for c in best], None)


def _probabilities(logits_of, images: list[np.ndarray]) -> np.ndarray:
    if not images:
        return np.zeros((0, 0), np.float32)
    batch = np.zeros((BATCH, *images[0].shape), np.uint8)  # one shape: one compilation
    batch[: len(images)] = images
    logits = np.asarray(logits_of({"image": batch}), np.float64)[: len(images)]
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)
