"""What both stages do before training: the workdir, the dataset, the teacher, the loaders."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
from typing import Any

import jax

from pand_jax import config as config_lib
from pand_jax import data as data_lib
from pand_jax.data import folder, pipeline, sources

LOCK_FILE = ".lock"


class WorkdirError(ValueError):
    """The workdir cannot be used; the message says why and what to do."""


def check_workdir(workdir: pathlib.Path, cfg: dict[str, Any], allow_change: bool) -> None:
    """Before any work, and writing nothing: the workdir is a folder (or can be made one) this
    process may write, and holds no run of another config."""
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == workdir else f"lies under the file {existing}"
        raise WorkdirError(f"--workdir {workdir} {where}; pass a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(
            f"cannot write into {existing} (read-only file system or no "
            "permission); pass a --workdir you can write to"
        )
    config_lib.check_same_run(workdir, cfg, allow_change)


_HELD: dict[pathlib.Path, Any] = {}  # workdir -> its open, locked lock file


def claim_workdir(
    workdir: pathlib.Path,
    cfg: dict[str, Any],
    info,
    skipped,
    *,
    unlabeled: folder.Unlabeled | None = None,
) -> None:
    """Once every check of the run has passed: the workdir is created, locked for this run, and
    given its config.json (and an image folder's record of labels, and the images left out of
    it and of the unlabelled images).

    The lock is an flock on WORKDIR/.lock: the OS drops it when the process ends however it
    ends (kill -9 leaves no stale lock), and a second run on the workdir is refused in one line
    naming the first one's pid. Process 0 holds it for a multi-process run."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    key = workdir.absolute()
    if key not in _HELD:
        lock = open(workdir / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            pid = lock.read().strip() or "?"
            lock.close()
            raise WorkdirError(
                f"another run (pid {pid}) is using {workdir}; wait for it to "
                "end, or pass another --workdir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _HELD[key] = lock
    config_lib.write_config(workdir, cfg)
    if info.tree is not None:
        folder.write_record(info.tree, workdir)
    roots = [x.root for x in (info.tree, unlabeled) if x is not None]
    if roots:
        folder.write_skipped(workdir, skipped, " and ".join(roots))


def release_workdir(workdir: pathlib.Path) -> None:
    lock = _HELD.pop(workdir.absolute(), None)
    if lock is not None:
        lock.close()


def open_dataset(info, cfg: dict[str, Any], unlabeled: int = 0):
    """(the run's dataset with the config's prompt template, the (path, reason) of the images
    left out). `info` was resolved once by the caller; an image folder is checked here (layout,
    every image, one full training batch with `unlabeled` readable unlabelled images). Nothing
    is written: `claim_workdir` records it."""
    if cfg["prompt_template"]:
        info = dataclasses.replace(info, prompt_template=cfg["prompt_template"])
    skipped = []
    if info.tree is not None:
        skipped = sources.check_folder(
            info,
            cfg["data_dir"],
            skip_bad_images=cfg["skip_bad_images"],
            train_split=train_split(info, cfg),
            batch_size=cfg["batch_size"],
            unlabeled=unlabeled,
        )
    return info, skipped


def open_unlabeled(cfg: dict[str, Any]):
    """(`--unlabeled-data`'s images or None, the (path, reason) of those left out), every image
    decoded once; unreadable ones are refused unless --skip-bad-images."""
    if not cfg.get("unlabeled_data"):  # Stage-PSC has no such key
        return None, []
    unlabeled = folder.unlabeled_images(cfg["unlabeled_data"])
    return unlabeled, folder.check_unlabeled(unlabeled, cfg["skip_bad_images"])


def train_source(info, split: str, cfg: dict[str, Any], unlabeled: folder.Unlabeled | None):
    """The training split (absent from a label-free image folder), then the unlabelled images
    (label -1)."""
    parts = []
    if info.tree is None or split in info.tree.files:
        parts.append(load_split(info, split, cfg))
    if unlabeled is not None:
        parts.append(folder.UnlabeledSource(unlabeled, cfg["skip_bad_images"]))
    if len(parts) == 1:
        return parts[0]
    return sources.ConcatSource(parts, "+".join(p.name for p in parts))


def load_split(info, split: str, cfg: dict[str, Any]):
    return data_lib.load_split(info, split, cfg["data_dir"], cfg["skip_bad_images"])


def steps_per_epoch(full: int, cfg: dict[str, Any]) -> int:
    """An epoch's steps, cut to `max_steps_per_epoch` when set (quick experiments, tests)."""
    return min(full, cfg["max_steps_per_epoch"]) if cfg["max_steps_per_epoch"] else full


def train_split(info, cfg: dict[str, Any]) -> str:
    """The dataset's official training split unless the config names another (for example
    `--set train_split=trainval` for FGVC-Aircraft)."""
    return cfg["train_split"] or info.train_split


def load_teacher(path: str, dtype, hint: str | None = None):
    """The converted CLIP teacher (or a CLIP student's CLIP, `hint` saying how to make it) and
    an id for cache keys and anchors."""
    from pand_jax import weights
    from pand_jax.models.clip import load_clip

    meta = weights.read_meta(
        path,
        "clip",
        hint=hint
        or f"Convert it with: python convert_weights.py --out {path}  (or pass --teacher DIR)",
    )
    teacher_id = (
        meta.get("teacher_id")
        or ":".join(str(meta.get(k)) for k in ("model", "pretrained") if meta.get(k))
        or str(path)
    )
    return load_clip(path, dtype=dtype), teacher_id


def load_intermediate(path: str, info, dtype):
    """DAIT's frozen intermediate teacher: the student `train.py --stage it` exported (its
    workdir or its student/ folder), in eval mode, for `info`'s classes in its label order."""
    from pand_jax import weights
    from pand_jax.models import student as student_lib

    hint = f"Train it with: python train.py --stage it --dataset {info.key}"
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no intermediate teacher at {path}. {hint}")
    exported = weights.existing(path / "student")  # in the IT's workdir
    model_dir = exported if exported.exists() else path
    meta = weights.read_meta(model_dir, student_lib.KIND, hint=hint)
    trained_on = meta.get("dataset")
    if meta["config"]["num_classes"] != info.num_classes or (
        meta.get("class_names") and list(meta["class_names"]) != list(info.class_names)
    ):
        raise ValueError(
            f"the intermediate teacher at {path} predicts the "
            f"{meta['config']['num_classes']} classes of {trained_on!r}, not the "
            f"{info.num_classes} of {info.key!r}. {hint}"
        )
    return student_lib.load_student(model_dir, dtype, hint=hint)


def intermediate_teacher_forwards(path: str) -> int | None:
    """The CLIP teacher passes that training the intermediate teacher took (its workdir's
    summary.json); None when not known (a student folder without its workdir)."""
    try:
        return int(
            json.loads((pathlib.Path(path) / "summary.json").read_text())["teacher_forwards"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def process_slice(global_batch: int) -> tuple[int, int]:
    """This process's rows [lo, hi) of a global batch (processes in order, equal shares)."""
    local = global_batch // jax.process_count()
    return jax.process_index() * local, (jax.process_index() + 1) * local


def eval_loader(
    info,
    split: str,
    cfg: dict[str, Any],
    *,
    size: int,
    resize: str,
    batch: int,
    cache_dir: pathlib.Path | None = None,
):
    """A split in order, every example once (the last batch padded)."""
    return pipeline.Loader(
        load_split(info, split, cfg),
        global_batch_size=batch,
        image_size=size,
        resize=resize,
        train=False,
        seed=cfg["seed"],
        cache_dir=cache_dir,
    )


def host_cache_dir(cfg: dict[str, Any], workdir: pathlib.Path) -> pathlib.Path | None:
    """Where the decoded, resized uint8 images of every epoch after the first come from
    (JPEG decoding on a few host cores cannot keep up with a GPU student step). One folder per
    process, so processes sharing a filesystem never write the same file. `host_cache_dir`
    lets runs on the same data share one (files are keyed by split, size and count)."""
    if not cfg["host_cache"]:
        return None
    base = pathlib.Path(cfg["host_cache_dir"] or workdir / "host_cache")
    return base / f"process{jax.process_index()}"
