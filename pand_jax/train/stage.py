"""The skeleton both stages share. A `Stage` opens a run (the dataset and any unlabelled images
checked, the device mesh, the compute dtype, the teacher), claims the workdir once every check
has passed, makes the evaluation loaders, and fits a `loop.Task`, adding the summary keys every
stage writes. A stage's `run` is then a short list of named steps on it."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
from jax.sharding import Mesh

from pand_jax import devices
from pand_jax.data import folder, pipeline
from pand_jax.train import loop, setup


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # "psc" or "nsd", for messages and summary.json
    cfg: dict[str, Any]
    workdir: pathlib.Path
    info: Any  # the dataset as the CLI resolved it, with the config's prompt template
    mesh: Mesh
    dtype: Any  # the compute dtype
    skipped: list  # (path, reason) of the images the checks left out
    unlabeled: folder.Unlabeled | None  # --unlabeled-data's images
    n_unlabeled: int  # how many of them are readable

    @classmethod
    def open(cls, name: str, cfg: dict[str, Any], workdir: pathlib.Path, info) -> Stage:
        """The run's dataset checked (an image folder: its layout and every image), and its
        unlabelled images; nothing is written yet."""
        unlabeled, skipped_unlabeled = setup.open_unlabeled(cfg)
        n_unlabeled = len(unlabeled.paths) - len(skipped_unlabeled) if unlabeled else 0
        info, skipped = setup.open_dataset(info, cfg, n_unlabeled)
        dtype = devices.compute_dtype(cfg["dtype"])
        return cls(
            name=name,
            cfg=cfg,
            workdir=workdir,
            info=info,
            mesh=devices.make_mesh(),
            dtype=dtype,
            skipped=skipped + skipped_unlabeled,
            unlabeled=unlabeled,
            n_unlabeled=n_unlabeled,
        )

    @property
    def train_split(self) -> str:
        return setup.train_split(self.info, self.cfg)

    def load_teacher(self, size_key: str):
        """(the CLIP teacher in the compute dtype, its id), refused in one line when its image
        tower cannot take the config's `size_key` (a ViT its own size only)."""
        clip, teacher_id = setup.load_teacher(self.cfg["teacher"], self.dtype)
        clip.check_image_size(self.cfg[size_key], size_key)
        return clip, teacher_id

    def claim(self) -> None:
        """Every check has passed: the workdir is locked and given its records."""
        setup.claim_workdir(
            self.workdir, self.cfg, self.info, self.skipped, unlabeled=self.unlabeled
        )

    def host_cache_dir(self) -> pathlib.Path | None:
        return setup.host_cache_dir(self.cfg, self.workdir)

    def eval_loader(
        self, split: str, *, size: int, resize: str, batch: int, cached: bool = False
    ) -> pipeline.Loader:
        """A split in order, every example once (the last batch padded)."""
        cache_dir = self.host_cache_dir() if cached else None
        return setup.eval_loader(
            self.info, split, self.cfg, size=size, resize=resize, batch=batch, cache_dir=cache_dir
        )

    def fit(self, task: loop.Task, state: Any, summary: dict[str, Any]) -> dict[str, Any]:
        """Trains (or resumes) the task for the config's epochs; summary.json holds `summary`
        after the keys every stage has."""
        return loop.fit(
            task,
            state,
            epochs=self.cfg["epochs"],
            workdir=self.workdir,
            checkpoints_to_keep=self.cfg["checkpoints_to_keep"],
            summary_extra={
                "dataset": self.info.key,
                "compute_dtype": np.dtype(self.dtype).name,
                "train_split": self.train_split,
                **summary,
            },
        )
