"""FDBPL's speed claim on one trainer: the teacher online against the teacher looked up.

    python bench/fdbpl_speed.py [--epochs 2] [--views 8 500] [--out /tmp/fdbpl_speed]

Runs `train.py --stage nsd --method fdbpl` on digits with the demo teacher (trained first if
`OUT/teacher` is missing) and configs/demo.json's Stage-NSD settings, in fresh workdirs, one
after another in this process's machine:
  - online: the teacher runs on every training view (`--teacher-cache 0`);
  - for each V of `--views`: the embedding cache (`--teacher-cache V`) and FKD's sparse labels
    (`--teacher-cache V --soft-labels ms:5`; digits has 10 classes, so K = 5 stands in for
    FDBPL's 10).
Each row gives the cache build (seconds, disk), the training step rate (images/s from
summary.json: steps only, no evaluation or compile), the whole run's wall time with the build
included, and the peak resident memory of the run's process. The demo teacher is tiny, so the
online step here costs little more than the lookup; the full teacher's forward is ~300 GFLOP
per 224 px view against ResNet-18's ~5.5 GFLOP for a training step's forward and backward, and
the RESULTS section projects from the measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pand_jax import cli  # noqa: E402
from pand_jax.cli.reproduce import demo_sets, ensure_demo_teacher  # noqa: E402


def folder_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run(name: str, extra: list[str], args, teacher: pathlib.Path) -> dict:
    """One Stage-NSD run in a fresh workdir; its figures."""
    workdir = args.out / name
    shutil.rmtree(workdir, ignore_errors=True)
    _, _, nsd_sets = demo_sets()
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        "--stage",
        "nsd",
        "--method",
        "fdbpl",
        "--dataset",
        "digits",
        "--teacher",
        str(teacher),
        "--no-psc",
        "--workdir",
        str(workdir),
        "--epochs",
        str(args.epochs),
        *extra,
    ]
    for item in nsd_sets:
        argv += ["--set", item]
    t = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS
    wall = time.perf_counter() - t
    if status:
        raise SystemExit(f"{name}: train.py failed ({status}): {' '.join(argv)}")
    summary = json.loads((workdir / "summary.json").read_text())
    return {
        "name": name,
        "wall": wall,
        "images_per_second": summary["images_per_second"],
        "train_seconds": summary["train_seconds"],
        "top1": summary["best_top1"],
        "teacher_forwards": summary["teacher_forwards"],
        "cache_bytes": folder_bytes(workdir / "teacher_cache"),
        "peak_mib": usage.ru_maxrss / 1024,
    }  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--views", type=int, nargs="+", default=[8, 500])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/fdbpl_speed"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.out / "teacher"
    ensure_demo_teacher(teacher)
    rows = [run("online", ["--teacher-cache", "0"], args, teacher)]
    for v in args.views:
        rows.append(run(f"embedding V={v}", ["--teacher-cache", str(v)], args, teacher))
        rows.append(
            run(f"ms:5 V={v}", ["--teacher-cache", str(v), "--soft-labels", "ms:5"], args, teacher)
        )
    print(
        f"\ndigits, demo teacher, ResNet-18 from scratch, {args.epochs} epochs, "
        "configs/demo.json's Stage-NSD settings\n"
    )
    print(
        "| teacher | teacher forwards | cache on disk | step images/s | train s | "
        "run wall s (build included) | peak RSS | best top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['teacher_forwards']:,} | {r['cache_bytes'] / 1e6:.1f} MB | "
            f"{r['images_per_second']:.0f} | {r['train_seconds']:.1f} | {r['wall']:.1f} | "
            f"{r['peak_mib']:.0f} MiB | {100 * r['top1']:.1f} |"
        )


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()
