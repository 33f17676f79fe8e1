"""The project's own TFDS builders: raw archive layouts -> array_record, no TensorFlow.

Each builder reads the folder a user already has (the extracted official archive) from
`manual_dir`. Images are stored as JPEG bytes; files that are not RGB JPEGs (greyscale,
RGBA, CMYK, PNG in disguise) are converted to RGB and re-encoded. Files that cannot be
decoded at all are collected and reported together at the end of the split, which aborts
the build: TFDS writes into an `.incomplete` folder and only renames it when every split
succeeded, so a failed build never looks complete.
"""

import inspect
import io
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from pand_jax.data import classnames

_JPEG_QUALITY = 95  # only for converted images; clean RGB JPEGs are stored byte for byte


class CorruptImagesError(RuntimeError):
    """Raised after a split when some of its image files could not be decoded."""


def rgb_jpeg_bytes(path: str) -> bytes:
    """The file's bytes if it is an RGB JPEG, else the image converted to an RGB JPEG."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # truncated files fail here, not later in the training loop
        if img.format == "JPEG" and img.mode == "RGB":
            return data
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=_JPEG_QUALITY)
        return out.getvalue()


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"expected the archive file {path}; is --manual-dir the right folder?")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _check_names(found: list[str], expected: tuple[str, ...], what: str) -> None:
    if list(found) != list(expected):
        diff = [(i, f, e) for i, (f, e) in enumerate(zip(found, expected)) if f != e][:5]
        raise ValueError(
            f"{what}: {len(found)} classes in the archive, expected {len(expected)} in the "
            f"order of pand_jax/data/classnames.py; first differences (index, found, expected): {diff}")


class _RawBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared part: features, split generation, corrupt-file reporting."""

    VERSION = tfds.core.Version("1.0.0")
    RAW_NAMES: tuple[str, ...] = ()
    LAYOUT = ""  # shown to users in MANUAL_DOWNLOAD_INSTRUCTIONS and errors

    # TFDS 4.9.10's own `code_path` needs the `importlib_resources` backport on Python >= 3.9
    # (an `isinstance` check evaluated before its fallback); the plain file path is all it
    # needs for builders defined in a regular package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(self.RAW_NAMES)),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(files) for split, files in self.split_files(root).items()}

    def split_files(self, root: str) -> dict[str, list[tuple[str, int]]]:
        """{split: [(image path, label)]} read from the archive layout under `root`."""
        raise NotImplementedError

    def _generate_examples(self, files: list[tuple[str, int]]) -> Iterator[tuple[str, dict]]:
        bad = []
        for path, label in files:
            try:
                image = rgb_jpeg_bytes(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                bad.append(f"{path} ({e})")
                continue
            name = os.path.basename(path)
            yield name, {"image": image, "label": label, "file_name": name}
        if bad:
            raise CorruptImagesError(
                f"{len(bad)} image file(s) could not be decoded; nothing was written. Replace or "
                "remove them and run prepare again:\n  " + "\n  ".join(bad))


class PandCub(_RawBuilder):
    """CUB-200-2011 from `CUB_200_2011/` (official train/test split)."""

    RAW_NAMES = classnames.CUB
    LAYOUT = "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract CUB_200_2011.tgz; the folder holds {LAYOUT}."

    def split_files(self, root):
        root = _find_root(root, "classes.txt", ["CUB_200_2011"], self.LAYOUT)
        names = [line.split(" ", 1)[1].split(".", 1)[1] for line in _read_lines(f"{root}/classes.txt")]
        _check_names(names, self.RAW_NAMES, "CUB classes.txt")
        paths = dict(line.split(" ", 1) for line in _read_lines(f"{root}/images.txt"))
        labels = dict(line.split() for line in _read_lines(f"{root}/image_class_labels.txt"))
        is_train = dict(line.split() for line in _read_lines(f"{root}/train_test_split.txt"))
        out = {"train": [], "test": []}
        for image_id, rel in paths.items():
            split = "train" if is_train[image_id] == "1" else "test"
            out[split].append((f"{root}/images/{rel}", int(labels[image_id]) - 1))
        return out


class PandAircraft(_RawBuilder):
    """FGVC-Aircraft 2013b, variant level, from `fgvc-aircraft-2013b/data/`.

    Splits train (3,334), val (3,333) and test (3,333); `load_split` serves trainval as
    train + val, so it needs no second copy on disk.
    """

    RAW_NAMES = tuple(classnames.AIRCRAFT)
    LAYOUT = "fgvc-aircraft-2013b/data/{variants.txt, images_variant_{train,val,test}.txt, images/}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract fgvc-aircraft-2013b.tar.gz; the folder holds {LAYOUT}."

    def split_files(self, root):
        root = _find_root(root, "variants.txt", ["fgvc-aircraft-2013b/data", "data"], self.LAYOUT)
        variants = _read_lines(f"{root}/variants.txt")
        _check_names(variants, self.RAW_NAMES, "FGVC-Aircraft variants.txt")
        label_of = {v: i for i, v in enumerate(variants)}
        out = {}
        for split in ("train", "val", "test"):
            # Lines are "<image id> <variant>"; variants contain spaces and slashes.
            rows = [line.split(" ", 1) for line in _read_lines(f"{root}/images_variant_{split}.txt")]
            out[split] = [(f"{root}/images/{image_id}.jpg", label_of[v]) for image_id, v in rows]
        return out


class PandPets(_RawBuilder):
    """Oxford-IIIT Pet from `images/` + `annotations/` (train = trainval, as in TFDS)."""

    RAW_NAMES = classnames.PETS
    LAYOUT = "images/*.jpg + annotations/{trainval.txt, test.txt}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract images.tar.gz and annotations.tar.gz side by side: {LAYOUT}."

    def split_files(self, root):
        root = _find_root(root, "annotations/trainval.txt", ["oxford-iiit-pet"], self.LAYOUT)
        out = {}
        for split, listing in (("train", "trainval.txt"), ("test", "test.txt")):
            rows = [line.split() for line in _read_lines(f"{root}/annotations/{listing}") if not line.startswith("#")]
            out[split] = [(f"{root}/images/{r[0]}.jpg", int(r[1]) - 1) for r in rows]
        return out


class PandDogs(_RawBuilder):
    """Stanford Dogs from `Images/` + `{train,test}_list.mat`."""

    RAW_NAMES = classnames.DOGS
    LAYOUT = "Images/<synset>-<name>/*.jpg + {train_list.mat, test_list.mat}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract images.tar and lists.tar side by side: {LAYOUT}."

    def split_files(self, root):
        from scipy.io import loadmat  # scipy ships with scikit-learn

        root = _find_root(root, "train_list.mat", [], self.LAYOUT)
        found = sorted(d for d in os.listdir(f"{root}/Images") if re.match(r"n\d{8}-", d))
        _check_names(found, self.RAW_NAMES, "Stanford Dogs Images/ folders")
        label_of = {name: i for i, name in enumerate(self.RAW_NAMES)}
        out = {}
        for split in ("train", "test"):
            files = loadmat(f"{root}/{split}_list.mat", squeeze_me=True)["file_list"]
            files = [str(f) for f in np.atleast_1d(files)]
            out[split] = [(f"{root}/Images/{f}", label_of[f.split("/")[0]]) for f in files]
        return out


def _find_root(root: str, marker: str, subdirs: list[str], layout: str) -> str:
    """`root` or the usual sub-folder of it that contains `marker`."""
    for cand in [root] + [f"{root}/{d}" for d in subdirs]:
        if os.path.exists(f"{cand}/{marker}"):
            return cand
    raise FileNotFoundError(f"no {marker} under {root} (also tried {subdirs}); expected the layout {layout}")


BUILDERS = {"cub": PandCub, "aircraft": PandAircraft, "pets": PandPets, "dogs": PandDogs}
