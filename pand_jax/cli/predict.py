"""`python predict.py --student DIR IMAGE_OR_FOLDER...`: the top classes of each image, by name,
with their probabilities. Any format PIL reads; folders are searched for image files. An
unreadable file is reported on stderr and the others are still predicted (exit code 1).

Output: one line per image, `PATH<TAB>CLASS (P), CLASS (P), ...`, or with --json one JSON object
per line: {"path": ..., "top": [{"class": ..., "probability": ...}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import sys

from pand_jax.cli import common


def parser() -> common.Parser:
    p = common.Parser(
        prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--student", required=True, help="student/ directory or its Stage-NSD workdir")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.top_k < 1:
        parser().error(f"--top-k must be at least 1, got {args.top_k}")

    def predict():
        from pand_jax import devices
        from pand_jax.deploy import predict as predict_lib
        from pand_jax.deploy import student as student_lib

        devices.report_devices(file=sys.stderr)  # stdout holds the predictions
        student = student_lib.load(args.student)
        paths = predict_lib.expand(args.images)
        if not paths:
            raise ValueError(f"no image files in {' '.join(args.images)}")
        failed = 0
        for p in predict_lib.predict(student, paths, args.top_k):
            if p.error:
                failed += 1
                print(f"error: cannot read {p.path}: {p.error}", file=sys.stderr)
            elif args.json:
                print(
                    json.dumps(
                        {"path": p.path, "top": [{"class": c, "probability": q} for c, q in p.top]}
                    )
                )
            else:
                print(p.path + "\t" + ", ".join(f"{c} ({q:.3f})" for c, q in p.top))
        if failed:
            print(f"{failed} of {len(paths)} files could not be read", file=sys.stderr)
        return 1 if failed else 0

    return common.run(predict)
