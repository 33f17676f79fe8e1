"""Text anchors on disk: what Stage-PSC exports and Stage-NSD reads with `--anchors`.

One .npz: `anchors` [C, D] L2-normalised float32, `class_names` [C], and a JSON `meta` string
(dataset, teacher id, n_ctx, accuracy, ...). Its `features` entry ({image_size, resize,
dtype}) says how the teacher's image features were computed, so that evaluate.py scores the
teacher as Stage-PSC did. NumPy reads it without pickle.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from pand_jax import files


class AnchorsError(ValueError):
    pass


def save(path: pathlib.Path, anchors: np.ndarray, info, **meta: Any) -> None:
    meta = {"dataset": info.key, "num_classes": len(info.class_names), **meta}
    size = np.asarray(anchors).size * 4 + 64 * len(info.class_names)  # about: floats + names
    with files.disk_full_errors(path, size, "the anchors"), files.atomic_path(path) as tmp:
        np.savez(
            tmp,
            anchors=np.asarray(anchors, np.float32),
            class_names=np.asarray(info.class_names),
            meta=np.asarray(json.dumps(meta)),
        )


def load(path: str | pathlib.Path, info) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads anchors and checks they were made for `info`'s classes, in its label order."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise AnchorsError(
            f"anchors file not found: {path}. Stage-PSC writes it: "
            f"python train.py --stage psc --dataset {info.key}"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            anchors, names, meta = f["anchors"], [str(n) for n in f["class_names"]], f["meta"]
            meta = json.loads(str(meta))
    except Exception as e:
        raise AnchorsError(f"{path} is not an anchors file written by Stage-PSC: {e}") from e
    expected = list(info.class_names)
    if len(names) != len(expected) or anchors.shape[0] != len(expected):
        raise AnchorsError(
            f"{path} has anchors for {anchors.shape[0]} classes (dataset {meta.get('dataset')!r}), "
            f"but {info.key} has {len(expected)}; run Stage-PSC for {info.key}."
        )
    if names != expected:
        bad = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
        raise AnchorsError(
            f"{path} does not match the class names of {info.key}: class {bad} is "
            f"{names[bad]!r} in the anchors but {expected[bad]!r} in the dataset."
        )
    norms = np.linalg.norm(anchors, axis=-1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise AnchorsError(
            f"{path}: anchors are not L2-normalised (norms {norms.min():.3f}.."
            f"{norms.max():.3f}); was it written by Stage-PSC?"
        )
    return anchors.astype(np.float32), meta


def check_teacher(
    path, anchors: np.ndarray, meta: dict[str, Any], *, teacher_id: str, width: int
) -> None:
    """Anchors are text features of one teacher: another teacher's (or another width) would
    compare the student with a space it never sees."""
    made_by = meta.get("teacher_id")
    if anchors.shape[1] != width:
        raise AnchorsError(
            f"{path} holds {anchors.shape[1]}-d anchors (teacher {made_by!r}) but "
            f"the teacher {teacher_id!r} embeds into {width} dimensions; run "
            "Stage-PSC with this --teacher, or pass its anchors"
        )
    if made_by and made_by != teacher_id:
        raise AnchorsError(
            f"{path} was made with the teacher {made_by!r}, not this run's "
            f"{teacher_id!r}; run Stage-PSC with this --teacher, or pass the "
            "--teacher the anchors were made with"
        )
