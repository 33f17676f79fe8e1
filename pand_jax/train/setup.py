"""What both stages do before training: the workdir, the dataset, the teacher, the loaders."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

from pand_jax import config as config_lib
from pand_jax import data as data_lib
from pand_jax.data import folder, pipeline, sources
from pand_jax.devices import check_batch_size


def prepare_workdir(workdir: pathlib.Path, cfg: dict[str, Any], allow_change: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.check_same_run(workdir, cfg, allow_change)
    if jax.process_index() == 0:
        config_lib.write_config(workdir, cfg)


def open_dataset(cfg: dict[str, Any], workdir: pathlib.Path):
    """The run's dataset, with the config's prompt template. An image folder is checked
    first (layout, every image, one full training batch) and its labels and left-out images
    are recorded in the workdir."""
    info = data_lib.get_dataset(cfg["dataset"])
    if cfg["prompt_template"]:
        info = dataclasses.replace(info, prompt_template=cfg["prompt_template"])
    if folder.is_folder(info.key):
        tree, skipped = sources.check_folder(info, cfg["data_dir"], cfg["skip_bad_images"],
                                             train_split(info, cfg), cfg["batch_size"])
        if jax.process_index() == 0:
            folder.write_record(tree, workdir, skipped)
    return info


def load_split(info, split: str, cfg: dict[str, Any]):
    return data_lib.load_split(info.key, split, cfg["data_dir"], cfg["skip_bad_images"])


def steps_per_epoch(full: int, cfg: dict[str, Any]) -> int:
    """An epoch's steps, cut to `max_steps_per_epoch` when set (quick experiments, tests)."""
    return min(full, cfg["max_steps_per_epoch"]) if cfg["max_steps_per_epoch"] else full


def train_split(info, cfg: dict[str, Any]) -> str:
    """The dataset's official training split unless the config names another (for example
    `--set train_split=trainval` for FGVC-Aircraft)."""
    return cfg["train_split"] or info.train_split


def load_teacher(path: str, dtype):
    """The converted CLIP teacher and an id for cache keys and anchors."""
    from pand_jax import weights
    from pand_jax.models.clip import load_clip

    meta = weights.read_meta(path, "clip", hint="Convert it with: python convert_weights.py "
                             f"--out {path}  (or pass --teacher DIR)")
    teacher_id = meta.get("teacher_id") or ":".join(
        str(meta.get(k)) for k in ("model", "pretrained") if meta.get(k)) or str(path)
    return load_clip(path, dtype=dtype), teacher_id


def process_slice(global_batch: int) -> tuple[int, int]:
    """This process's rows [lo, hi) of a global batch (processes in order, equal shares)."""
    local = global_batch // jax.process_count()
    return jax.process_index() * local, (jax.process_index() + 1) * local


def eval_loader(info, split: str, cfg: dict[str, Any], size: int, resize: str, batch: int, mesh,
                cache_dir: pathlib.Path | None = None):
    check_batch_size(batch, mesh, "evaluation batch size")
    return pipeline.Loader(load_split(info, split, cfg), global_batch_size=batch, image_size=size,
                           resize=resize, train=False, seed=cfg["seed"], cache_dir=cache_dir)


def host_cache_dir(cfg: dict[str, Any], workdir: pathlib.Path) -> pathlib.Path | None:
    """Where the decoded, resized uint8 images of every epoch after the first come from
    (JPEG decoding on a few host cores cannot keep up with a GPU student step). One folder per
    process, so processes sharing a filesystem never write the same file. `host_cache_dir`
    lets runs on the same data share one (files are keyed by split, size and count)."""
    if not cfg["host_cache"]:
        return None
    base = pathlib.Path(cfg["host_cache_dir"] or workdir / "host_cache")
    return base / f"process{jax.process_index()}"

