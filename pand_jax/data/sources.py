"""Random-access sources: `load_split(dataset, split)` -> dicts {image, label, index}."""

import functools
import os

import numpy as np
from PIL import Image

from pand_jax.data import folder
from pand_jax.data.datasets import DatasetInfo, get_dataset

DEFAULT_DATA_DIR = os.path.expanduser("~/tensorflow_datasets")


class ArraySource:
    """In-memory source (digits); `images` uint8 [N, H, W, 3]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str | None = None):
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "index": int(i)}


class ConcatSource:
    """Sources (TFDS data sources, or a split and unlabelled images) one after the other, with
    the stable `index` added."""

    def __init__(self, parts: list, name: str):
        self.parts, self.name = parts, name  # name keys the pipeline's uint8 cache
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a split of {len(self)} examples")
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        ex = self.parts[part][i - int(self.offsets[part])]
        return {"image": ex["image"], "label": int(ex["label"]), "index": i}


@functools.cache
def _digits(size: int = 32) -> dict[str, ArraySource]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    grey = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # values are 0..16
    big = np.stack(
        [np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey]
    )
    rgb = np.repeat(big[..., None], 3, axis=-1)
    idx_train, idx_test = train_test_split(
        np.arange(len(grey)), test_size=0.25, stratify=d.target, random_state=0
    )
    return {
        s: ArraySource(rgb[ix], d.target[ix].astype(np.int64), name=f"digits{size}-{s}")
        for s, ix in (("train", np.sort(idx_train)), ("test", np.sort(idx_test)))
    }


def _prepare_command(key: str, data_dir: str) -> str:
    return f"python -m pand_jax.data.prepare --dataset {key} --data-dir {data_dir} --manual-dir RAW"


def check_folder(
    info,
    data_dir: str | None,
    *,
    skip_bad_images: bool,
    train_split: str,
    batch_size: int,
    unlabeled: int = 0,
) -> list[tuple[str, str]]:
    """The (path, reason) of an image folder's images to leave out, after decoding every image
    (unless it was prepared: preparing checks them) and checking that the training split, with
    `unlabeled` readable unlabelled images, fills one batch; every problem is raised before
    anything runs. `info.tree` is the folder's scan."""
    tree = info.tree
    prepared = prepared_dir(info, data_dir or DEFAULT_DATA_DIR) is not None
    skipped = [] if prepared else folder.check_images(tree, skip_bad_images)
    if train_split not in tree.files and not unlabeled:
        raise folder.FolderError(
            f"{tree.root}/{train_split} is missing; expected {tree.root}/{train_split}/<class>/"
            "<images> (or, for a method that reads no labels, images without labels from "
            "--unlabeled-data folder:DIR)"
        )
    left_out = {p for p, _ in skipped}
    n = sum(p not in left_out for p, _ in tree.files.get(train_split, ()))
    if n + unlabeled < batch_size:
        where = f"{tree.root}/{train_split}" + (" with the unlabelled images" if unlabeled else "")
        raise folder.FolderError(
            f"{where} has {n + unlabeled} readable images, fewer than one training batch of "
            f"{batch_size}; lower --batch-size or add images"
        )
    return skipped


def _info(dataset) -> DatasetInfo:
    return dataset if isinstance(dataset, DatasetInfo) else get_dataset(dataset)


def prepared_dir(dataset, data_dir: str) -> str | None:
    """The newest prepared version folder of the project's or the official builder, if any.
    `dataset` is a key or a resolved DatasetInfo (which saves scanning a folder again)."""
    info = _info(dataset)
    for name in (info.tfds_name, info.official_tfds_name):
        root = os.path.join(data_dir, name) if name else None
        if root and os.path.isdir(root):
            versions = sorted(
                v
                for v in os.listdir(root)
                if os.path.exists(os.path.join(root, v, "dataset_info.json"))
            )
            if versions:
                return os.path.join(root, versions[-1])
    return None


def load_split(dataset, split: str, data_dir: str | None = None, skip_bad_images: bool = False):
    """Random-access source of {image: uint8 HWC RGB, label: int, index: int} for one split.

    `dataset` is a key or a resolved DatasetInfo (an image folder's scan is then reused). An
    image folder is read from its prepared copy in `data_dir` when there is one, else
    directly (leaving out unreadable files when `skip_bad_images`)."""
    info = _info(dataset)
    key = info.key
    if info.tfds_name is None:
        return _split_of(_digits(info.image_size), split, key)
    import tensorflow_datasets as tfds

    data_dir = data_dir or DEFAULT_DATA_DIR
    path = prepared_dir(info, data_dir)
    if path is None and info.tree is not None:
        return folder.FolderSource(info.tree, split, skip_bad_images)
    if path is None:
        raise FileNotFoundError(
            f"dataset {key!r} is not prepared under {data_dir}; run:\n  "
            f"{_prepare_command(key, data_dir)}"
        )
    sources = tfds.builder_from_directory(path).as_data_source()
    if os.path.basename(os.path.dirname(path)) == info.official_tfds_name:
        split = info.official_splits.get(split, split)
    name = info.tfds_name if folder.is_folder(key) else key  # a folder key is a path
    if split == "trainval" and "trainval" not in sources and {"train", "val"} <= set(sources):
        return ConcatSource([sources["train"], sources["val"]], f"{name}-trainval")  # FGVC-Aircraft
    return ConcatSource([_split_of(sources, split, key)], f"{name}-{split}")


def _split_of(splits: dict, split: str, key: str):
    if split not in splits:
        extra = ["trainval"] if {"train", "val"} <= set(splits) else []
        raise ValueError(
            f"dataset {key!r} has no split {split!r}; splits: {', '.join(list(splits) + extra)}"
        )
    return splits[split]
