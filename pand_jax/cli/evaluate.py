"""`python evaluate.py --student DIR`: top-1, top-5 and mean per-class accuracy of a trained
student on a dataset split, per-class accuracy, a confusion matrix and the most confident
mistakes; with --teacher, the CLIP teacher on the same split for comparison.

DIR is the student/ directory Stage-NSD exports or the workdir holding it. The student sees the
transform, batch size and compute dtype of Stage-NSD's evaluation (from the workdir's config.json
when there is one, else 224 px), so its top-1 is the best_top1 that training reported.
Writes OUTDIR/metrics.json, per_class.csv, predictions.npz, confusion.png and mistakes.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from pand_jax.cli import common


def parser() -> common.Parser:
    p = common.Parser(
        prog="evaluate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python evaluate.py --student runs/cub/nsd/pand-resnet18\n"
        "  python evaluate.py --student runs/cub/nsd/pand-resnet18 "
        "--teacher weights/teacher --anchors runs/cub/psc/anchors.npz",
    )
    p.add_argument("--student", required=True, help="student/ directory or its Stage-NSD workdir")
    p.add_argument("--dataset", help="dataset key (default: the one the student was trained on)")
    p.add_argument("--split", help="split to evaluate (default: the dataset's test split)")
    p.add_argument("--out", help="output folder (default: DIR/eval-SPLIT)")
    p.add_argument("--data-dir", help="prepared datasets (default: the training run's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="global batch size (default: the training run's eval_batch_size, else 128)",
    )
    p.add_argument("--teacher", help="converted CLIP teacher to evaluate on the same split")
    p.add_argument(
        "--anchors",
        help="with --teacher: Stage-PSC's anchors.npz (learned prompts); "
        "without it the teacher is zero-shot with the dataset's prompt template",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.anchors and not args.teacher:
        parser().error("--anchors needs --teacher WEIGHTS")

    def evaluate():
        from pand_jax import devices
        from pand_jax.deploy import evaluate as evaluate_lib

        devices.report_devices()
        out = pathlib.Path(args.out or pathlib.Path(args.student) / f"eval-{args.split or 'test'}")
        scores = evaluate_lib.evaluate(
            args.student,
            args.dataset,
            args.split,
            out,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            teacher=args.teacher,
            anchors=args.anchors,
        )
        print(evaluate_lib.table(scores))
        print(f"report in {out}: " + json.dumps(sorted(p.name for p in out.iterdir())))

    return common.run(evaluate)
