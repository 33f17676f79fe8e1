"""Registry of the datasets PAND is evaluated on (docs/paper_vs_code.md, "Data"), plus `digits`."""

import dataclasses
import re

from pand_jax.data import classnames


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
    tfds_name: str | None  # the project's own builder (pand_jax.data.builders); None: no preparation
    official_tfds_name: str | None  # TFDS's builder (needs TensorFlow to build), if any
    image_size: int  # natural host resolution for the demo / learning tests

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.key}: {len(self.class_names)} class names, expected {self.num_classes}")
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


DATASETS: dict[str, DatasetInfo] = {
    "cub": DatasetInfo(
        key="cub", num_classes=200, class_names=tuple(map(_cub_name, classnames.CUB)),
        prompt_template="a photo of {}, a type of bird", train_split="train", test_split="test",
        val_split=None, source="CUB-200-2011 (Caltech), official train/test split",
        tfds_name="pand_cub", official_tfds_name="caltech_birds2011", image_size=256),
    "aircraft": DatasetInfo(
        key="aircraft", num_classes=100,
        class_names=tuple(_aircraft_name(v, m) for v, m in classnames.AIRCRAFT.items()),
        prompt_template="a photo of {}, one of the airplane models", train_split="train",
        test_split="test", val_split="val",
        source="FGVC-Aircraft 2013b (Oxford VGG), variant level; trainval = train + val",
        tfds_name="pand_aircraft", official_tfds_name=None, image_size=256),
    "pets": DatasetInfo(
        key="pets", num_classes=37, class_names=tuple(map(_pets_name, classnames.PETS)),
        prompt_template="a photo of {}, a type of pet", train_split="train", test_split="test",
        val_split=None, source="Oxford-IIIT Pet (Oxford VGG); train = official trainval",
        tfds_name="pand_pets", official_tfds_name="oxford_iiit_pet", image_size=256),
    "dogs": DatasetInfo(
        key="dogs", num_classes=120, class_names=tuple(map(_dogs_name, classnames.DOGS)),
        prompt_template="a photo of {}, a type of dog", train_split="train", test_split="test",
        val_split=None, source="Stanford Dogs (ImageNet subset), official train/test lists",
        tfds_name="pand_dogs", official_tfds_name="stanford_dogs", image_size=256),
    "digits": DatasetInfo(
        key="digits", num_classes=10, class_names=tuple(str(d) for d in range(10)),
        prompt_template="a photo of the digit {}", train_split="train", test_split="test",
        val_split=None, source="scikit-learn load_digits (bundled, 1,797 images 8x8), "
        "stratified 75/25 split, seed 0", tfds_name=None, official_tfds_name=None, image_size=32),
}


def get_dataset(key: str) -> DatasetInfo:
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {key!r}; valid keys: {', '.join(DATASETS)}")
    return DATASETS[key]
