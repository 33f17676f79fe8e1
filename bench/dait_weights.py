"""DAIT's loss weights on the demo and on a folder dataset: alpha and beta (stage 1, the
intermediate teacher) and gamma and delta (stage 2, the student), over seeds.

    python bench/dait_weights.py [--workdir runs/bench_dait] [--seeds 0,1] [--epochs 6]
                                 [--datasets digits,shapes]
    (recorded: --datasets digits --seeds 0, and --datasets shapes --seeds 0 --epochs 15)

Both datasets use the demo's trained ConvNeXt teacher (`train.py --demo --workdir
WORKDIR/demo`, run first if missing) and the demo's Stage-NSD settings (32 px, batch 64,
AdamW 2e-3, students from scratch). `digits` reads the demo's PSC anchors. `shapes` is an image
folder this script draws (8 classes of filled and outlined shapes on random backgrounds, 150
training and 50 test images each, 48 px), a domain the digits teacher never saw; Stage-PSC runs
on it first.

For each seed: a MobileNet-V2 intermediate teacher per (alpha, beta), each then distilled into a
ResNet-18 at the first (gamma, delta) pair, (1, 0); and, from the first IT, (1, 1), a ResNet-18
per (gamma, delta). Prints one markdown table per dataset: mean and min/max of best top-1 over
seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pand_jax import cli  # noqa: E402
from pand_jax.cli.reproduce import demo_sets  # noqa: E402
from pand_jax.cli.train import main as train  # noqa: E402

# The demo's Stage-NSD settings (configs/demo.json's nsd section) as command-line flags, for
# both stages (--stage it and nsd).
DEMO_NSD = [flag for item in demo_sets()[2] for flag in ("--set", item)]
ALPHA_BETA = [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (10.0, 10.0)]
GAMMA_DELTA = [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (10.0, 0.0)]
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "hollow_square", "cross", "bar")


def pairs(text: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in pair.split(",")) for pair in text.split(";")]


def draw_shape(d, shape: str, x: int, y: int, r: int, fill: tuple) -> None:
    """One of SHAPES, centred at (x, y) with half-size r, onto the ImageDraw d."""
    box = (x - r, y - r, x + r, y + r)
    {
        "circle": lambda: d.ellipse(box, fill=fill),
        "square": lambda: d.rectangle(box, fill=fill),
        "triangle": lambda: d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill),
        "diamond": lambda: d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill),
        "ring": lambda: d.ellipse(box, outline=fill, width=4),
        "hollow_square": lambda: d.rectangle(box, outline=fill, width=4),
        "cross": lambda: (
            d.rectangle((x - r, y - 3, x + r, y + 3), fill=fill),
            d.rectangle((x - 3, y - r, x + 3, y + r), fill=fill),
        ),
        "bar": lambda: d.rectangle((x - r, y - 3, x + r, y + 3), fill=fill),
    }[shape]()


def draw_shapes(root: pathlib.Path, train_n: int = 150, test_n: int = 50) -> None:
    """An ImageFolder of 48 px drawn shapes, random colours, positions and sizes."""
    if (root / "test").is_dir():
        return
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for split, n in (("train", train_n), ("test", test_n)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (48, 48), tuple(rng.randrange(256) for _ in range(3)))
                x, y, r = rng.randrange(16, 32), rng.randrange(16, 32), rng.randrange(9, 15)
                fill = tuple(rng.randrange(256) for _ in range(3))
                draw_shape(ImageDraw.Draw(img), shape, x, y, r, fill)
                img.save(folder / f"{i}.png")


def run(args: list[str], workdir: pathlib.Path) -> dict:
    if not (workdir / "summary.json").is_file():
        start = time.perf_counter()
        assert train([*args, "--workdir", str(workdir)]) == 0, args
        (workdir / "wall_s").write_text(f"{time.perf_counter() - start:.1f}")
    return {
        **json.loads((workdir / "summary.json").read_text()),
        "wall_s": float((workdir / "wall_s").read_text()),
    }


def sweep(
    root: pathlib.Path,
    dataset: str,
    anchors: pathlib.Path,
    teacher: pathlib.Path,
    seeds: list[int],
    epochs: int,
    alpha_beta: list,
    gamma_delta: list,
) -> dict[str, list[float]]:
    base = [
        *DEMO_NSD,
        "--dataset",
        dataset,
        "--epochs",
        str(epochs),
        "--teacher",
        str(teacher),
        "--anchors",
        str(anchors),
    ]
    top1: dict[str, list[float]] = {}

    def record(row: str, summary: dict) -> None:
        top1.setdefault(row, []).append(100 * summary["best_top1"])

    for seed in seeds:
        seeded = [*base, "--set", f"seed={seed}"]
        its = {}
        for a, b in alpha_beta:
            it = root / f"seed{seed}" / f"it_a{a:g}_b{b:g}"
            s = run(
                [
                    "--stage",
                    "it",
                    *seeded,
                    "--set",
                    f"loss.dait.alpha={a}",
                    "--set",
                    f"loss.dait.beta={b}",
                ],
                it,
            )
            record(f"IT alpha={a:g} beta={b:g}: the IT (MobileNet-V2)", s)
            its[a, b] = it
        for (a, b), it in its.items():
            for g, d in gamma_delta if (a, b) == alpha_beta[0] else gamma_delta[:1]:
                s = run(
                    [
                        "--stage",
                        "nsd",
                        *seeded,
                        "--method",
                        "dait",
                        "--intermediate-teacher",
                        str(it),
                        "--set",
                        f"loss.dait.gamma={g}",
                        "--set",
                        f"loss.dait.delta={d}",
                    ],
                    root / f"seed{seed}" / f"nsd_a{a:g}_b{b:g}_g{g:g}_d{d:g}",
                )
                record(f"IT alpha={a:g} beta={b:g}, student gamma={g:g} delta={d:g}", s)
    return top1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "bench_dait")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--datasets", default="digits,shapes")
    p.add_argument(
        "--alpha-beta",
        type=pairs,
        default=ALPHA_BETA,
        help="stage-1 weights, e.g. '1,1;0,0' (the first is the default IT)",
    )
    p.add_argument(
        "--gamma-delta",
        type=pairs,
        default=GAMMA_DELTA,
        help="stage-2 weights, e.g. '1,0;1,1' (the first is used from every IT)",
    )
    args = p.parse_args()
    root, seeds = args.workdir, [int(s) for s in args.seeds.split(",")]
    demo = root / "demo"
    if not (demo / "psc" / "anchors.npz").is_file():
        assert train(["--demo", "--workdir", str(demo)]) == 0
    teacher = demo / "teacher"
    for name in args.datasets.split(","):
        if name == "digits":
            dataset, anchors = "digits", demo / "psc" / "anchors.npz"
        else:
            draw_shapes(root / "shapes_data")
            dataset, anchors = f"folder:{root / 'shapes_data'}", root / "shapes_psc" / "anchors.npz"
            if not anchors.is_file():
                assert (
                    train(
                        [
                            "--stage",
                            "psc",
                            "--dataset",
                            dataset,
                            "--teacher",
                            str(teacher),
                            "--epochs",
                            "10",
                            "--batch-size",
                            "64",
                            "--set",
                            "feature_image_size=32",
                            "--set",
                            "feature_batch_size=64",
                            "--set",
                            "dtype=float32",
                            "--workdir",
                            str(anchors.parent),
                        ]
                    )
                    == 0
                )
        top1 = sweep(
            root / f"{name}-{args.epochs}epochs",
            dataset,
            anchors,
            teacher,
            seeds,
            args.epochs,
            args.alpha_beta,
            args.gamma_delta,
        )
        print(
            f"\n{name}: best top-1 % over seeds {args.seeds}\n\n| run | mean | min | max |\n"
            "|---|---|---|---|"
        )
        for row, v in top1.items():
            print(f"| {row} | {np.mean(v):.2f} | {min(v):.2f} | {max(v):.2f} |")


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()
