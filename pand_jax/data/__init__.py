"""Data: dataset registry, preparation, host pipeline (grain) and on-device augmentation."""

from pand_jax.data.datasets import DATASETS, DatasetInfo, get_dataset
from pand_jax.data.sources import load_split

__all__ = ["DATASETS", "DatasetInfo", "get_dataset", "load_split"]
