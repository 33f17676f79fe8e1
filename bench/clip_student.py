"""A CLIP image tower as the student on the demo: what prompt learning adds to the CLIP's own
zero-shot accuracy, alone (cross-entropy) and distilled from the demo's ConvNeXt teacher.

    python bench/clip_student.py [--workdir runs/bench_clip_student] [--epochs 6]

Uses the demo's trained ConvNeXt teacher and Stage-PSC anchors from `train.py --demo --workdir
WORKDIR/demo` (run first if missing), trains the demo's ViT CLIP on digits' captions as the
student's CLIP (configs/demo.json, teacher_variants.vit), then runs Stage-NSD at the demo's
settings with `--student clip:...` (prompt depth 2: the tower has 2 layers) for several methods,
and prints one table row per run: best top-1, trainable parameters, wall seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pand_jax import cli  # noqa: E402
from pand_jax.cli.reproduce import demo_sets  # noqa: E402
from pand_jax.cli.train import main as train  # noqa: E402
from pand_jax.train import demo  # noqa: E402

# The demo's Stage-NSD settings (configs/demo.json's nsd section) as command-line flags, with
# the student's prompts two layers deep.
DEMO_NSD = [
    "--stage",
    "nsd",
    "--dataset",
    "digits",
    *(flag for item in demo_sets()[2] for flag in ("--set", item)),
    "--set",
    "student_prompt_depth=2",
]


def runs(root: pathlib.Path) -> dict[str, list[str]]:
    d = root / "demo"
    teacher, anchors = (
        ["--teacher", str(d / "teacher")],
        ["--anchors", str(d / "psc" / "anchors.npz")],
    )
    return {
        "none (CE), prompts": ["--method", "none"],
        "none (CE), whole tower": ["--method", "none", "--set", "student_train=all"],
        "KD, prompts": ["--method", "kd", *teacher],
        "PAND, prompts": ["--method", "pand", *teacher, *anchors],
        "PromptKD (no labels), prompts": ["--method", "promptkd", *teacher, *anchors],
        "FDBPL (no labels), prompts and dual text contexts": [
            "--method",
            "fdbpl",
            *teacher,
            *anchors,
        ],
        "none (CE), prompts and a text context": [
            "--method",
            "none",
            "--set",
            "student_text_context=4",
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "bench_clip_student")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    root = args.workdir
    if not (root / "demo" / "psc" / "anchors.npz").is_file():
        assert train(["--demo", "--workdir", str(root / "demo")]) == 0
    d = demo.demo_config()
    vit_dir = root / "student_clip"
    zero_shot = demo.train_teacher(demo.teacher_section(d, "vit"), vit_dir)
    rows = [("the ViT CLIP's zero-shot (template prompt)", 100 * zero_shot, 0, 0.0)]
    for name, flags in runs(root).items():
        workdir = root / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        start = time.perf_counter()
        assert (
            train(
                DEMO_NSD
                + [
                    "--epochs",
                    str(args.epochs),
                    "--student",
                    f"clip:{vit_dir}",
                    "--workdir",
                    str(workdir),
                    *flags,
                ]
            )
            == 0
        )
        wall = time.perf_counter() - start
        summary = json.loads((workdir / "summary.json").read_text())
        rows.append((name, 100 * summary["best_top1"], summary["trainable_parameters"], wall))
    print("| run | best top-1 % | trainable parameters | wall s |\n|---|---|---|---|")
    for name, top1, n, wall in rows:
        print(f"| {name} | {top1:.1f} | {n:,} | {wall:.0f} |")


if __name__ == "__main__":
    cli.start()  # as the command-line tools do: XLA:CPU's option, huge pages
    main()
