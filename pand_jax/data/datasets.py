"""Registry of the datasets PAND is evaluated on, three more fine-grained benchmarks,
`digits`, and any image folder (`folder:PATH`, see `folder.py`)."""

import dataclasses
import hashlib
import re

from pand_jax.data import classnames, folder


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    key: str
    num_classes: int
    class_names: tuple[str, ...]  # human-readable, 0-based label order
    prompt_template: str  # contains "{}" for the class name
    train_split: str
    test_split: str
    val_split: str | None  # PSC model selection split; None -> the test split (released code)
    source: str
    tfds_name: (
        str | None
    )  # the project's own builder (pand_jax.data.builders); None: no preparation
    official_tfds_name: str | None  # TFDS's builder (needs TensorFlow to build), if any
    image_size: int  # natural host resolution for the demo / learning tests
    fingerprint: str | None = None  # image folders: changes with their files; keys the caches
    tree: folder.Tree | None = dataclasses.field(default=None, compare=False, repr=False)  # folders
    # Split names of the official builder where they differ from ours (ours -> TFDS's).
    official_splits: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.key}: {len(self.class_names)} class names, expected {self.num_classes}"
            )
        if "{}" not in self.prompt_template:
            raise ValueError(f"{self.key}: prompt template {self.prompt_template!r} has no '{{}}'")


def _cub_name(raw: str) -> str:
    return raw.replace("_", " ")


def _aircraft_name(variant: str, manufacturer: str) -> str:
    # "707-320" -> "Boeing 707-320"; variants already named after their maker ("Boeing 717",
    # "Cessna 172", "ATR-42", "Gulfstream IV") are not prefixed twice.
    if re.match(re.escape(manufacturer.split()[0]) + r"\b", variant, re.IGNORECASE):
        return variant
    return f"{manufacturer} {variant}"


def _pets_name(raw: str) -> str:
    return " ".join(w.capitalize() for w in raw.split("_"))


def _dogs_name(raw: str) -> str:
    return raw.split("-", 1)[1].replace("_", " ")


def _food_name(raw: str) -> str:
    return raw.replace("_", " ")


DATASETS: dict[str, DatasetInfo] = {
    "cub": DatasetInfo(
        key="cub",
        num_classes=200,
        class_names=tuple(map(_cub_name, classnames.CUB)),
        prompt_template="a photo of {}, a type of bird",
        train_split="train",
        test_split="test",
        val_split=None,
        source="CUB-200-2011 (Caltech), official train/test split",
        tfds_name="pand_cub",
        official_tfds_name="caltech_birds2011",
        image_size=256,
    ),
    "aircraft": DatasetInfo(
        key="aircraft",
        num_classes=100,
        class_names=tuple(_aircraft_name(v, m) for v, m in classnames.AIRCRAFT.items()),
        prompt_template="a photo of {}, one of the airplane models",
        train_split="train",
        test_split="test",
        val_split="val",
        source="FGVC-Aircraft 2013b (Oxford VGG), variant level; trainval = train + val",
        tfds_name="pand_aircraft",
        official_tfds_name=None,
        image_size=256,
    ),
    "pets": DatasetInfo(
        key="pets",
        num_classes=37,
        class_names=tuple(map(_pets_name, classnames.PETS)),
        prompt_template="a photo of {}, a type of pet",
        train_split="train",
        test_split="test",
        val_split=None,
        source="Oxford-IIIT Pet (Oxford VGG); train = official trainval",
        tfds_name="pand_pets",
        official_tfds_name="oxford_iiit_pet",
        image_size=256,
    ),
    "dogs": DatasetInfo(
        key="dogs",
        num_classes=120,
        class_names=tuple(map(_dogs_name, classnames.DOGS)),
        prompt_template="a photo of {}, a type of dog",
        train_split="train",
        test_split="test",
        val_split=None,
        source="Stanford Dogs (ImageNet subset), official train/test lists",
        tfds_name="pand_dogs",
        official_tfds_name="stanford_dogs",
        image_size=256,
    ),
    # Templates and class names as in CoOp.
    "cars": DatasetInfo(
        key="cars",
        num_classes=196,
        class_names=classnames.CARS,
        prompt_template="a photo of a {}.",
        train_split="train",
        test_split="test",
        val_split=None,
        source="Stanford Cars (Krause et al. 2013), official train/test split",
        tfds_name="pand_cars",
        official_tfds_name="cars196",
        image_size=256,
    ),
    "flowers": DatasetInfo(
        key="flowers",
        num_classes=102,
        class_names=classnames.FLOWERS,
        prompt_template="a photo of a {}, a type of flower.",
        train_split="train",
        test_split="test",
        val_split="val",
        source="Oxford Flowers-102 (Oxford VGG), official setid.mat train/val/test split",
        tfds_name="pand_flowers",
        official_tfds_name="oxford_flowers102",
        image_size=256,
        official_splits={"val": "validation"},
    ),
    "food": DatasetInfo(
        key="food",
        num_classes=101,
        class_names=tuple(map(_food_name, classnames.FOOD)),
        prompt_template="a photo of {}, a type of food.",
        train_split="train",
        test_split="test",
        val_split=None,
        source="Food-101 (ETH Zurich), official meta/train.txt and meta/test.txt",
        tfds_name="pand_food",
        official_tfds_name="food101",
        image_size=256,
        official_splits={"test": "validation"},
    ),  # TFDS calls the official test list validation
    "digits": DatasetInfo(
        key="digits",
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        prompt_template="a photo of the digit {}",
        train_split="train",
        test_split="test",
        val_split=None,
        source="scikit-learn load_digits (bundled, 1,797 images 8x8), "
        "stratified 75/25 split, seed 0",
        tfds_name=None,
        official_tfds_name=None,
        image_size=32,
    ),
}


def get_dataset(key: str) -> DatasetInfo:
    if folder.is_folder(key):
        return folder_info(folder.scan(folder.root_of(key)))
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {key!r}; valid keys: {', '.join(DATASETS)}, "
            "or folder:PATH for your own images"
        )
    return DATASETS[key]


def folder_info(tree: folder.Tree) -> DatasetInfo:
    # The prepared copy's name changes with the files, so a stale copy is never read.
    safe = re.sub(r"[^a-z0-9]+", "_", folder.run_name(folder.PREFIX + tree.root).lower())
    return DatasetInfo(
        key=folder.PREFIX + tree.root,
        num_classes=len(tree.folders),
        class_names=tree.class_names,
        prompt_template=folder.DEFAULT_TEMPLATE,
        train_split="train",
        test_split="test",
        val_split="val" if "val" in tree.files else None,
        source=f"image folder {tree.root}",
        tfds_name=f"pand_{safe}_{tree.fingerprint[:10]}",
        official_tfds_name=None,
        image_size=256,
        fingerprint=tree.fingerprint,
        tree=tree,
    )


def run_name(key: str) -> str:
    """The dataset's folder under runs/ (file-system safe). A folder's carries a short hash of
    its absolute path, so two folders with one base name (a/birds, b/birds) never share runs."""
    if not folder.is_folder(key):
        return key
    where = hashlib.sha256(folder.root_of(key).encode()).hexdigest()[:8]
    return f"{folder.run_name(key)}-{where}"
