"""Write a dataset as array_record that `tfds.data_source` reads without TensorFlow.

    python -m pand_jax.data.prepare --dataset KEY --data-dir DIR [--manual-dir RAW] [--official]
    python -m pand_jax.data.prepare --dataset folder:PATH --data-dir DIR

By default the project's own builders read the raw archive in RAW (no TensorFlow needed).
An image folder needs no RAW: its prepared copy is named after its files, and training with
the same --data-dir reads it instead of the folder while the folder is unchanged.
`--official` builds TFDS's own builder instead (caltech_birds2011, oxford_iiit_pet,
stanford_dogs, cars196, oxford_flowers102, food101): it downloads and needs TensorFlow
(`pip install 'pand_jax[tensorflow]'`).
"""

import argparse
import sys

from pand_jax.data.datasets import DATASETS, get_dataset


def prepare(key: str, data_dir: str, manual_dir: str | None = None, official: bool = False) -> str:
    """Build (or reuse) the dataset and check every split reads back; returns its folder."""
    import tensorflow_datasets as tfds

    info = get_dataset(key)
    if info.tfds_name is None:
        raise ValueError(f"dataset {key!r} ships with scikit-learn and needs no preparation")
    if official:
        builder = _official_builder(info, data_dir)
    elif info.tree is not None:
        from pand_jax.data.builders import folder_builder

        builder = folder_builder(info.tree, info.tfds_name)(
            data_dir=data_dir, file_format="array_record"
        )
        manual_dir = info.tree.root
    else:
        from pand_jax.data.builders import BUILDERS

        if manual_dir is None:
            raise ValueError(
                f"--manual-dir is required for {key!r}: "
                f"{BUILDERS[key].MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        builder = BUILDERS[key](data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    _verify(builder)
    return str(builder.data_dir)


def _official_builder(info, data_dir: str):
    import tensorflow_datasets as tfds

    if info.official_tfds_name is None:
        raise ValueError(
            f"TFDS has no builder for {info.key!r}; use the project's builder (drop --official)"
        )
    try:
        import tensorflow  # noqa: F401  (TFDS's official builders decode and encode with it)
    except ImportError as e:
        raise ImportError(
            f"building TFDS's {info.official_tfds_name!r} needs TensorFlow: "
            "pip install 'pand_jax[tensorflow]', "
            "or drop --official to use the project's builder on the raw archive (--manual-dir)"
        ) from e
    return tfds.builder(info.official_tfds_name, data_dir=data_dir, file_format="array_record")


def _verify(builder) -> None:
    """Every split must read back with the example count recorded at build time."""
    sources = builder.as_data_source()
    for split, split_info in builder.info.splits.items():
        n = len(sources[split])
        if n != split_info.num_examples or n == 0:
            raise RuntimeError(
                f"{builder.data_dir}: split {split!r} reads {n} examples, expected "
                f"{split_info.num_examples}"
            )
        sources[split][n - 1]  # the last record decodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="KEY",
        help=", ".join(k for k, d in DATASETS.items() if d.tfds_name) + ", or folder:PATH",
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--manual-dir", help="the extracted raw archive (project builders)")
    parser.add_argument(
        "--official", action="store_true", help="TFDS's own builder (needs TensorFlow)"
    )
    args = parser.parse_args(argv)
    try:
        path = prepare(args.dataset, args.data_dir, args.manual_dir, args.official)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {args.dataset} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
