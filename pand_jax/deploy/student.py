"""A trained student as evaluate.py, predict.py and export.py find it: the `student/` directory
Stage-NSD exports (or the NSD workdir holding it), its classes, and the settings of the
evaluation it was selected with (image size, batch size, compute dtype, data directory, ...).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from pand_jax import config as config_lib
from pand_jax import devices, weights
from pand_jax.data import augment, pipeline
from pand_jax.models import student as student_lib

STUDENT_DIR = "student"
# The evaluation settings a student is used with: its own record's, else its workdir's
# config.json's, else Stage-NSD's defaults in configs/nsd.json (`default_settings`).
SETTINGS = (
    "image_size",
    "eval_batch_size",
    "dtype",
    "data_dir",
    "skip_bad_images",
    "prompt_template",
)
TRAIN_HINT = "Train one with: python train.py --stage nsd --dataset DATASET"


@dataclasses.dataclass
class TrainedStudent:
    model: student_lib.Student
    meta: dict[str, Any]  # the student's config.json: dataset, class_names, top1, ...
    settings: dict[str, Any]  # SETTINGS' keys

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        return list(names) if names else [str(i) for i in range(self.model.num_classes)]

    @property
    def image_size(self) -> int:
        return int(self.settings["image_size"])


def default_settings() -> dict[str, Any]:
    """SETTINGS as Stage-NSD's defaults (configs/nsd.json) give them."""
    nsd = config_lib.default_config("nsd")
    return {k: nsd[k] for k in SETTINGS}


def _recorded_stage(workdir: pathlib.Path) -> str | None:
    try:
        return json.loads((workdir / "config.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def _workdir_config(workdir: pathlib.Path) -> dict[str, Any]:
    path = workdir / "config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    return cfg if cfg.get("stage") == "nsd" else {}


def load(path: str | pathlib.Path) -> TrainedStudent:
    """`path` is a student directory or the Stage-NSD workdir holding `student/`. Settings come
    from the student's own record, then its workdir's config.json, then Stage-NSD's defaults."""
    path = weights.existing(path)  # or the complete copy a kill during its export left
    if not path.exists():
        raise FileNotFoundError(f"no student at {path} (no such directory). {TRAIN_HINT}")
    if _recorded_stage(path) == "psc":
        raise ValueError(
            f"{path} is a Stage-PSC workdir (it holds text anchors, not a student); "
            "pass the Stage-NSD workdir, or its student/"
        )
    if _workdir_config(path):
        student = weights.existing(path / STUDENT_DIR)
        if not (student / weights.CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"the Stage-NSD workdir {path} has no {STUDENT_DIR}/ yet: it "
                "is written at the first evaluation of the training run"
            )
        path = path / STUDENT_DIR
    meta = weights.read_meta(path, student_lib.KIND, hint=TRAIN_HINT)
    cfg = _workdir_config(path.parent)
    settings = {k: meta.get(k, cfg.get(k, v)) for k, v in default_settings().items()}
    # A damaged trained student is made again by its training run, not by a converter.
    model = student_lib.load_student(
        path,
        devices.compute_dtype(settings["dtype"]),
        hint="Run its training command again: it resumes and "
        f"exports the best student. {TRAIN_HINT}",
    )
    return TrainedStudent(model, meta, settings)


def check_classes(student: TrainedStudent, info) -> None:
    """The student's head must predict `info`'s classes, in its label order."""
    if student.model.num_classes != info.num_classes:
        raise ValueError(
            f"the student predicts {student.model.num_classes} classes but dataset "
            f"{info.key!r} has {info.num_classes}; pass the dataset it was trained "
            f"on (--dataset {student.meta.get('dataset') or '?'})"
        )
    if student.meta.get("class_names") and list(student.meta["class_names"]) != list(
        info.class_names
    ):
        raise ValueError(
            f"the student's class names differ from those of dataset {info.key!r}; "
            f"it was trained on {student.meta.get('dataset')!r}"
        )


def logits_fn(student: TrainedStudent, mesh=None):
    """jitted `fn(batch) -> logits [B, C]` float32 on uint8 images already resized to the
    student's image size: Stage-NSD's evaluation transform (CLIP normalisation)."""
    size = student.image_size
    return devices.jit_apply(
        student.model,
        lambda m, b: m(augment.eval_transform(b["image"], size)).astype(jnp.float32),
        mesh,
    )


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC RGB -> [size, size, 3] as Stage-NSD's evaluation loader does it (stretch)."""
    return pipeline.resize_image(image, size, "stretch")
