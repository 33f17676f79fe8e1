"""The general-purpose logit distillers beside KD and CE alone: DKD, DIST, function matching,
and KD and DKD with logit standardisation, over seeds. Each method runs at its reproduce.py
Table 1 row (its configs/nsd.json section; function matching's sets augment=mixup); the
standardised rows at their authors' recipes (STANDARDIZED).

    python bench/logit_kd.py [--workdir runs/bench_logit_kd] [--seeds 0,1,2] [--epochs 6]
                             [--datasets digits,shapes]
    (recorded: --datasets digits --seeds 0,1,2, and --datasets shapes --seeds 0)

Both datasets use the demo's trained ConvNeXt teacher (`train.py --demo --workdir
WORKDIR/demo`, run first if missing), its template anchors, and the demo's Stage-NSD settings
(32 px, batch 64, AdamW 2e-3, a ResNet-18 from scratch). `shapes` is bench/dait_weights.py's
drawn folder (8 classes, 48 px), a domain the digits teacher never saw. Prints one markdown
table per dataset: the last epoch's test top-1 (no epoch is selected), mean, 95 % t-interval
over seeds where there are several, min and max; and the images/s of training.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from scipy import stats

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from dait_weights import DEMO_NSD, draw_shapes, run  # noqa: E402

from pand_jax import cli  # noqa: E402
from pand_jax.cli.train import main as train  # noqa: E402
from pand_jax.experiments import plan  # noqa: E402
from pand_jax.methods import Row  # noqa: E402

METHODS = ("none", "kd", "dkd", "dist", "fm")  # with CE alone for scale
# logit-standardization-KD's README commands (--logit-stand --base-temp 2 --kd-weight 9):
# KD at T 2 with the KL weighted 9 (CE 1); DKD with alpha and beta times 9, T 2.
STANDARDIZED = (
    Row(
        "KD + logit std.",
        "kd",
        (("loss.kd.standardize", True), ("loss.kd.temperature", 2.0), ("loss.kd.weight", 9.0)),
    ),
    Row(
        "DKD + logit std.",
        "dkd",
        (
            ("loss.dkd.standardize", True),
            ("loss.dkd.temperature", 2.0),
            ("loss.dkd.alpha", 9.0),
            ("loss.dkd.beta", 4.5),
        ),
    ),
)


def interval(values: list[float]) -> str:
    """The 95 % Student-t interval of the mean, or '-' for one value."""
    if len(values) < 2:
        return "-"
    lo, hi = stats.t.interval(0.95, len(values) - 1, np.mean(values), stats.sem(values))
    return f"{lo:.2f}-{hi:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "bench_logit_kd")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--datasets", default="digits,shapes")
    p.add_argument("--rows", help="only the rows of these methods (comma-separated names)")
    args = p.parse_args()
    root, seeds = args.workdir, [int(s) for s in args.seeds.split(",")]
    demo = root / "demo"
    if not (demo / "teacher").is_dir():
        assert train(["--demo", "--workdir", str(demo)]) == 0
    rows = [row for row in plan.table1() if row.method in METHODS] + list(STANDARDIZED)
    if args.rows:
        rows = [row for row in rows if row.method in args.rows.split(",")]
    for name in args.datasets.split(","):
        dataset = "digits"
        if name == "shapes":
            draw_shapes(root / "shapes_data")
            dataset = f"folder:{root / 'shapes_data'}"
        base = [*DEMO_NSD, "--stage", "nsd", "--dataset", dataset, "--epochs", str(args.epochs)]
        base += ["--teacher", str(demo / "teacher")]
        print(
            f"\n{name}, {args.epochs} epochs: last-epoch test top-1 % over seeds {args.seeds}\n\n"
            "| row | mean | 95 % interval | min | max | images/s |\n|---|---|---|---|---|---|"
        )
        for row in rows:
            runs = [
                run(
                    [*base, *plan.row_argv(row), "--set", f"seed={seed}"],
                    root / name / f"{plan.variant(row)}-seed{seed}",
                )
                for seed in seeds
            ]
            top1 = [100 * s["last_top1"] for s in runs]
            speed = np.mean([s["images_per_second"] for s in runs])
            print(
                f"| {row.label} | {np.mean(top1):.2f} | {interval(top1)} | {min(top1):.2f} | "
                f"{max(top1):.2f} | {speed:.0f} |"
            )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()
