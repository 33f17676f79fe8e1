"""The project's own TFDS builders: raw archive layouts -> array_record, no TensorFlow.

Each builder reads the folder a user already has from `manual_dir` (or, for `folder:PATH`,
the image folder itself). Images are stored as JPEG bytes; files that are not upright RGB
JPEGs (greyscale, RGBA, CMYK, 16-bit, PNG in disguise, EXIF-rotated) go through
`images.read_rgb` and are re-encoded. Files that cannot be decoded at all are collected
and reported together at the end of the split, which aborts the build: TFDS writes into an
`.incomplete` folder and only renames it when every split succeeded, so a failed build never
looks complete.
"""

import inspect
import io
import os
import re
import types
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from pand_jax.data import classnames, folder, images

_JPEG_QUALITY = 95  # only for converted images; clean RGB JPEGs are stored byte for byte
_ORIENTATION = 0x0112  # the EXIF tag


class CorruptImagesError(RuntimeError):
    """Raised after a split when some of its image files could not be decoded."""


def rgb_jpeg_bytes(path: str) -> bytes:
    """The file's bytes if it is an upright RGB JPEG, else `images.read_rgb` of it as a JPEG."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # truncated files fail here, not later in the training loop
        # Decoders of the stored bytes ignore EXIF, so rotated files are stored upright.
        if img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(_ORIENTATION, 1) == 1:
            return data
    out = io.BytesIO()
    images.read_rgb(path).save(out, format="JPEG", quality=_JPEG_QUALITY)
    return out.getvalue()


def _archive_file(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"expected the archive file {path}; is --manual-dir the right folder?"
        )
    return path


def _read_lines(path: str) -> list[str]:
    with open(_archive_file(path)) as f:
        return [line.strip() for line in f if line.strip()]


def _check_names(found: list[str], expected: tuple[str, ...], what: str) -> None:
    if list(found) != list(expected):
        diff = [(i, f, e) for i, (f, e) in enumerate(zip(found, expected)) if f != e][:5]
        raise ValueError(
            f"{what}: {len(found)} classes in the archive, expected {len(expected)} in the "
            "order of pand_jax/data/classnames.py; first differences (index, found, expected): "
            f"{diff}"
        )


class _RawBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared part: features, split generation, corrupt-file reporting."""

    VERSION = tfds.core.Version("1.0.0")
    RAW_NAMES: tuple[str, ...] = ()
    LAYOUT = ""  # shown to users in MANUAL_DOWNLOAD_INSTRUCTIONS and errors
    KEEP_ORDER = False  # store examples in generation order, not TFDS's hash order

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
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(self.RAW_NAMES)),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=self.KEEP_ORDER,
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {
            split: self._generate_examples(files) for split, files in self.split_files(root).items()
        }

    def split_files(self, root: str) -> dict[str, list[tuple[str, int]]]:
        """{split: [(image path, label)]} read from the archive layout under `root`."""
        raise NotImplementedError

    def example_name(self, path: str) -> str:
        """The example's key and file_name (unique within a split)."""
        return os.path.basename(path)

    def _generate_examples(self, files: list[tuple[str, int]]) -> Iterator[tuple[str, dict]]:
        bad = []
        for path, label in files:
            try:
                image = rgb_jpeg_bytes(path)
            except images.READ_ERRORS as e:
                bad.append(f"{path} ({e})")
                continue
            name = self.example_name(path)
            yield name, {"image": image, "label": label, "file_name": name}
        if bad:
            raise CorruptImagesError(
                f"{len(bad)} image file(s) could not be decoded; nothing was written. Replace or "
                "remove them and run prepare again:\n  " + "\n  ".join(bad)
            )


class PandCub(_RawBuilder):
    """CUB-200-2011 from `CUB_200_2011/` (official train/test split)."""

    RAW_NAMES = classnames.CUB
    LAYOUT = (
        "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
        "images/}"
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract CUB_200_2011.tgz; the folder holds {LAYOUT}."

    def split_files(self, root):
        root = _find_root(root, "classes.txt", ["CUB_200_2011"], self.LAYOUT)
        names = [
            line.split(" ", 1)[1].split(".", 1)[1] for line in _read_lines(f"{root}/classes.txt")
        ]
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
            rows = [
                line.split(" ", 1) for line in _read_lines(f"{root}/images_variant_{split}.txt")
            ]
            out[split] = [(f"{root}/images/{image_id}.jpg", label_of[v]) for image_id, v in rows]
        return out


class PandPets(_RawBuilder):
    """Oxford-IIIT Pet from `images/` + `annotations/` (train = trainval, as in TFDS)."""

    RAW_NAMES = classnames.PETS
    LAYOUT = "images/*.jpg + annotations/{trainval.txt, test.txt}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Extract images.tar.gz and annotations.tar.gz side by side: {LAYOUT}."
    )

    def split_files(self, root):
        root = _find_root(root, "annotations/trainval.txt", ["oxford-iiit-pet"], self.LAYOUT)
        out = {}
        for split, listing in (("train", "trainval.txt"), ("test", "test.txt")):
            rows = [
                line.split()
                for line in _read_lines(f"{root}/annotations/{listing}")
                if not line.startswith("#")
            ]
            out[split] = [(f"{root}/images/{r[0]}.jpg", int(r[1]) - 1) for r in rows]
        return out


class PandDogs(_RawBuilder):
    """Stanford Dogs from `Images/` + `{train,test}_list.mat`."""

    RAW_NAMES = classnames.DOGS
    LAYOUT = "Images/<synset>-<name>/*.jpg + {train_list.mat, test_list.mat}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract images.tar and lists.tar side by side: {LAYOUT}."

    def split_files(self, root):
        root = _find_root(root, "train_list.mat", [], self.LAYOUT)
        found = sorted(d for d in os.listdir(f"{root}/Images") if re.match(r"n\d{8}-", d))
        _check_names(found, self.RAW_NAMES, "Stanford Dogs Images/ folders")
        label_of = {name: i for i, name in enumerate(self.RAW_NAMES)}
        out = {}
        for split in ("train", "test"):
            files = _loadmat(f"{root}/{split}_list.mat")["file_list"]
            files = [str(f) for f in np.atleast_1d(files)]
            out[split] = [(f"{root}/Images/{f}", label_of[f.split("/")[0]]) for f in files]
        return out


class PandCars(_RawBuilder):
    """Stanford Cars from `cars_train/`, `cars_test/` and the devkit's .mat files."""

    RAW_NAMES = classnames.CARS
    LAYOUT = (
        "{cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        "cars_test_annos_withlabels.mat}"
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract cars_train.tgz, cars_test.tgz and car_devkit.tgz side by side and put "
        f"cars_test_annos_withlabels.mat next to them (or in devkit/): {LAYOUT}."
    )

    def split_files(self, root):
        root = _find_root(root, "devkit/cars_meta.mat", ["stanford_cars", "cars"], self.LAYOUT)
        meta = _loadmat(f"{root}/devkit/cars_meta.mat")
        _check_names(
            [str(n) for n in np.atleast_1d(meta["class_names"])],
            self.RAW_NAMES,
            "Stanford Cars devkit/cars_meta.mat",
        )
        test_annos = next(
            (
                p
                for p in (
                    f"{root}/cars_test_annos_withlabels.mat",
                    f"{root}/devkit/cars_test_annos_withlabels.mat",
                )
                if os.path.exists(p)
            ),
            f"{root}/cars_test_annos_withlabels.mat",
        )
        out = {}
        train_annos = f"{root}/devkit/cars_train_annos.mat"
        for split, annos in (("train", train_annos), ("test", test_annos)):
            rows = np.atleast_1d(_loadmat(annos)["annotations"])
            out[split] = [(f"{root}/cars_{split}/{r['fname']}", int(r["class"]) - 1) for r in rows]
        return out


class PandFlowers(_RawBuilder):
    """Oxford Flowers-102 from `jpg/`, `imagelabels.mat` and `setid.mat`.

    setid.mat's `trnid` is the train split, `valid` val and `tstid` test (1,020 / 1,020 /
    6,149 images: the larger set is the test split, as in the paper and CoOp).
    """

    RAW_NAMES = classnames.FLOWERS
    LAYOUT = "{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Extract 102flowers.tgz and put imagelabels.mat and setid.mat next to jpg/: {LAYOUT}."
    )

    def split_files(self, root):
        root = _find_root(root, "setid.mat", ["flowers-102", "oxford_flowers102"], self.LAYOUT)
        labels = np.atleast_1d(_loadmat(f"{root}/imagelabels.mat")["labels"]).astype(int)
        # The archive has no class names, only labels 1..102; check there are that many.
        _check_names(
            sorted(set(labels.tolist())),
            tuple(range(1, len(self.RAW_NAMES) + 1)),
            "Oxford Flowers-102 imagelabels.mat labels",
        )
        setid = _loadmat(f"{root}/setid.mat")
        return {
            split: [
                (f"{root}/jpg/image_{i:05d}.jpg", int(labels[i - 1]) - 1)
                for i in np.atleast_1d(setid[key]).astype(int)
            ]
            for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
        }


class PandFood(_RawBuilder):
    """Food-101 from `food-101/{meta/, images/}` (official train/test lists)."""

    RAW_NAMES = classnames.FOOD
    LAYOUT = "food-101/{meta/classes.txt, meta/train.txt, meta/test.txt, images/<class>/*.jpg}"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract food-101.tar.gz; the folder holds {LAYOUT}."

    def split_files(self, root):
        root = _find_root(root, "meta/classes.txt", ["food-101"], self.LAYOUT)
        found = _read_lines(f"{root}/meta/classes.txt")
        _check_names(found, self.RAW_NAMES, "Food-101 meta/classes.txt")
        label_of = {name: i for i, name in enumerate(found)}
        # Lines are "<class>/<image id>".
        return {
            split: [
                (f"{root}/images/{rel}.jpg", label_of[rel.split("/")[0]])
                for rel in _read_lines(f"{root}/meta/{split}.txt")
            ]
            for split in ("train", "test")
        }

    def example_name(self, path):
        return "/".join(path.split("/")[-2:])  # <class>/<image id>.jpg


class PandFolder(_RawBuilder):
    """An image folder (`folder:PATH`); `folder_builder` makes one subclass per folder."""

    KEEP_ORDER = True  # the prepared copy has the folder's order: the same index, the same image
    TREE: folder.Tree | None = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The image folder itself: PATH/{train,test}/<class>/<images>."

    def split_files(self, root):
        return {split: list(files) for split, files in self.TREE.files.items()}

    def example_name(self, path):
        return os.path.relpath(path, self.TREE.root)  # file names repeat across class folders


def folder_builder(tree: folder.Tree, name: str) -> type[PandFolder]:
    def body(ns):
        ns.update(name=name, TREE=tree, RAW_NAMES=tree.folders, LAYOUT=tree.root)

    return types.new_class(name, (PandFolder,), {"skip_registration": True}, body)


def _loadmat(path: str) -> dict:
    from scipy.io import loadmat  # scipy ships with scikit-learn

    return loadmat(_archive_file(path), squeeze_me=True)


def _find_root(root: str, marker: str, subdirs: list[str], layout: str) -> str:
    """`root` or the usual sub-folder of it that contains `marker`."""
    for cand in [root] + [f"{root}/{d}" for d in subdirs]:
        if os.path.exists(f"{cand}/{marker}"):
            return cand
    raise FileNotFoundError(
        f"no {marker} under {root} (also tried {subdirs}); expected the layout {layout}"
    )


BUILDERS = {
    "cub": PandCub,
    "aircraft": PandAircraft,
    "pets": PandPets,
    "dogs": PandDogs,
    "cars": PandCars,
    "flowers": PandFlowers,
    "food": PandFood,
}
