"""The runs' numbers gathered from their workdirs into results.csv and the paper's tables
(results.md), each cell beside the number the paper reports."""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np

from pand_jax import config as config_lib
from pand_jax import methods
from pand_jax.experiments import plan

DATASET_NAMES = {
    "cub": "CUB-200-2011",
    "aircraft": "FGVC-Aircraft",
    "pets": "Oxford-IIIT Pet",
    "dogs": "Stanford Dogs",
    "cars": "Stanford Cars",
    "flowers": "Oxford Flowers-102",
    "food": "Food-101",
    "digits": "digits (offline demo)",
}
STUDENT_NAMES = {"resnet18": "ResNet-18", "mobilenet_v2": "MobileNet-V2"}
# Top-1 (%) the paper reports, by (dataset, student, row); every other cell is unknown to us.
PAPER = {
    ("cub", "resnet18"): {"VL2Lite": 72.67, "+PSC": 73.52, "+NSD": 75.91, "PAND": 76.09},
    ("cub", "mobilenet_v2"): {"PAND": 76.52},
}
PAPER_SWEEP = {("cub", "resnet18"): {0.5: 76.41}}  # the sensitivity study (Fig. 4)
# The paper's best PAND result per dataset, for which the public listings name no student.
PAPER_BEST_UNKNOWN_STUDENT = {"aircraft": 64.75, "dogs": 74.98, "pets": 88.97}
CSV_FIELDS = (
    "dataset",
    "student",
    "method",
    "no_psc",
    "sweep_value",
    "seed",
    "epochs",
    "best_top1",
    "last_top1",
    "best_epoch",
    "images_per_second",
    "train_seconds",
    "wall_seconds",
    "teacher_mode",
    "teacher_forwards",
    "workdir",
)


@dataclasses.dataclass(frozen=True)
class Result:
    dataset: str
    student: str
    method: str
    no_psc: bool
    # the value of the sensitivity study's key (`plan.paper_method().sweep`), for the runs of
    # the method that reads it
    sweep_value: float | None
    seed: int
    epochs: int
    best_top1: float
    last_top1: float
    best_epoch: int
    images_per_second: float
    train_seconds: float | None  # timed training steps; None: run of an earlier version
    wall_seconds: float | None  # its epochs' wall time: compilation, evaluation too
    teacher_mode: str | None  # "online", "cached", or None: no teacher
    teacher_forwards: int | None  # teacher forward passes the method needs
    workdir: pathlib.Path
    config: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def rows(self) -> set[str]:
        """The labels of the rows of Tables 1-2 this run fills."""
        return {
            row.label
            for row in plan.table1() + plan.ablations()
            if row.method == self.method
            and all(_get(self.config, k) == v for k, v in row.values().items())
        }


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _sweep_value(cfg: dict, method: str) -> float | None:
    """The run's value of the swept key, if its method reads that key's section."""
    key = plan.paper_method().sweep.key
    section = key.split(".")[1]
    return float(_get(cfg, key)) if section in methods.get(method).sections else None


def collect(out: pathlib.Path) -> list[Result]:
    """Every finished Stage-NSD run under OUT/nsd (whatever plan made it)."""
    results = []
    for summary_path in sorted((pathlib.Path(out) / "nsd").rglob("summary.json")):
        workdir = summary_path.parent
        s = json.loads(summary_path.read_text())
        cfg = config_lib.recorded_config(workdir, "nsd")
        results.append(
            Result(
                dataset=s["dataset"],
                student=s["student"],
                method=s["method"],
                no_psc=bool(s["no_psc"]),
                sweep_value=_sweep_value(cfg, s["method"]),
                seed=int(cfg["seed"]),
                epochs=int(s["epochs"]),
                best_top1=s["best_top1"],
                last_top1=s["last_top1"],
                best_epoch=s["best_epoch"],
                images_per_second=s["images_per_second"],
                train_seconds=s.get("train_seconds"),
                wall_seconds=s.get("wall_seconds"),
                teacher_mode=s.get("teacher_mode"),
                teacher_forwards=s.get("teacher_forwards"),
                workdir=workdir,
                config=cfg,
            )
        )
    return results


def write_csv(results: list[Result], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in results:
            row = {k: v for k, v in dataclasses.asdict(r).items() if k in CSV_FIELDS}
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def top1s(
    results: list[Result],
    dataset: str,
    student: str,
    *,
    row: str | None = None,
    sweep_value: float | None = None,
) -> np.ndarray:
    """Best top-1 (%) over seeds of one table cell: a row of Tables 1-2, or a point of the
    sensitivity study."""
    return np.asarray(
        [
            100 * r.best_top1
            for r in results
            if (r.dataset, r.student) == (dataset, student)
            and (
                row in r.rows
                if row is not None
                else (r.no_psc, r.sweep_value) == (False, sweep_value)
            )
        ]
    )


def _cell(values: np.ndarray, paper: float | None) -> list[str]:
    """ours (mean +- std), n, paper, difference."""
    if len(values) == 0:
        ours = "-"
    elif len(values) == 1:
        ours = f"{values[0]:.2f}"
    else:
        ours = f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    diff = f"{values.mean() - paper:+.2f}" if len(values) and paper is not None else "-"
    return [ours, str(len(values)), "-" if paper is None else f"{paper:.2f}", diff]


def _table(first: str, labels, students, cell) -> list[str]:
    head = [first] + [
        f"{STUDENT_NAMES.get(s, s)} {c}" for s in students for c in ("ours", "n", "paper", "Δ")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        lines.append(
            "| " + " | ".join([str(label)] + [x for s in students for x in cell(label, s)]) + " |"
        )
    return lines


def _cost_table(labels, students, runs) -> list[str]:
    head = ["method"] + [
        f"{STUDENT_NAMES.get(s, s)} {c}"
        for s in students
        for c in ("teacher", "teacher passes", "img/s", "wall s")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean(values, fmt):
        values = [v for v in values if v is not None]
        return format(float(np.mean(values)), fmt) if values else "-"

    for label in labels:
        cells = [label]
        for s in students:
            rs = runs(label, s)
            modes = sorted({r.teacher_mode or "no teacher" for r in rs}) or ["-"]
            cells += [
                "/".join(modes),
                mean([r.teacher_forwards for r in rs], ",.0f"),
                mean([r.images_per_second for r in rs], ".1f"),
                mean([r.wall_seconds for r in rs], ".1f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


COST_NOTE = (
    "Per run, mean over seeds: where the teacher ran (online in every step, or cached once: its "
    "views shared by every run of a seed), the teacher forward passes the method needs (images "
    "through the teacher), training images/s (compilation excluded) and the wall time of its "
    "epochs (compilation and evaluation included; the teacher cache's build is counted in its "
    "passes). DAIT's passes are its intermediate teacher's training's, whose wall time is not "
    "added."
)


def markdown(results: list[Result]) -> str:
    """The paper's tables for every dataset in `results`."""
    lines = []
    for dataset in sorted({r.dataset for r in results}):
        lines += _dataset_markdown([r for r in results if r.dataset == dataset], dataset)
    return "\n".join(lines)


def _dataset_markdown(rs: list[Result], dataset: str) -> list[str]:
    students = sorted({r.student for r in rs}, key=lambda s: (s not in STUDENT_NAMES, s))
    epochs = ", ".join(map(str, sorted({r.epochs for r in rs})))
    lines = [
        f"# {DATASET_NAMES.get(dataset, dataset)}: ours beside the paper",
        "",
        "Top-1 test accuracy (%) at each run's best epoch: mean ± std over seeds (n "
        'runs); paper: the paper\'s number ("-": not known); Δ = ours − paper. '
        f"Epochs: {epochs}.",
        "",
    ]
    method = plan.paper_method()
    if dataset in PAPER_BEST_UNKNOWN_STUDENT:
        lines += [
            f"The paper's best {method.label} result on this dataset is "
            f"{PAPER_BEST_UNKNOWN_STUDENT[dataset]:.2f} (the student is not stated).",
            "",
        ]

    def row_cell(label, s):
        return _cell(top1s(rs, dataset, s, row=label), PAPER.get((dataset, s), {}).get(label))

    def sweep_cell(value, s):
        value, paper = float(value), PAPER_SWEEP.get((dataset, s), {})
        return _cell(top1s(rs, dataset, s, sweep_value=value), paper.get(value))

    def runs(label, s):
        return [r for r in rs if label in r.rows and r.student == s]

    table1 = [row.label for row in plan.table1()]
    values = sorted({r.sweep_value for r in rs if r.sweep_value is not None and not r.no_psc})
    symbol = method.sweep.symbol
    return lines + [
        f"## Table 1: {method.label} against the baselines",
        "",
        *_table("method", table1, students, row_cell),
        "",
        "## What each method cost to train",
        "",
        COST_NOTE,
        "",
        *_cost_table(table1, students, runs),
        "",
        "## Table 2: ablation",
        "",
        *_table("method", plan.ablation_table(), students, row_cell),
        "",
        f"## Sensitivity to {symbol} ({method.label})",
        "",
        *_table(symbol, [f"{x:g}" for x in values], students, sweep_cell),
        "",
    ]
