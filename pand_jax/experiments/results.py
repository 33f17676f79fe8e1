"""The runs' numbers gathered from their workdirs into results.csv and the paper's tables
(results.md), each cell beside the number the paper reports."""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np

from pand_jax.experiments import plan

DATASET_NAMES = {"cub": "CUB-200-2011", "aircraft": "FGVC-Aircraft", "pets": "Oxford-IIIT Pet",
                 "dogs": "Stanford Dogs", "cars": "Stanford Cars", "flowers": "Oxford Flowers-102",
                 "food": "Food-101", "digits": "digits (offline demo)"}
STUDENT_NAMES = {"resnet18": "ResNet-18", "mobilenet_v2": "MobileNet-V2"}
# Top-1 (%) the paper reports, by (dataset, student, row); every other cell is unknown to us.
PAPER = {
    ("cub", "resnet18"): {"VL2Lite": 72.67, "+PSC": 73.52, "+NSD": 75.91, "PAND": 76.09},
    ("cub", "mobilenet_v2"): {"PAND": 76.52},
}
PAPER_LAMBDA = {("cub", "resnet18"): {0.5: 76.41}}  # the sensitivity study (Fig. 4)
# The paper's best PAND result per dataset, for which the public listings name no student.
PAPER_BEST_UNKNOWN_STUDENT = {"aircraft": 64.75, "dogs": 74.98, "pets": 88.97}
TABLE1 = ("no KD", "KD", "RKD", "VL2Lite", "PAND")
TABLE2 = ("VL2Lite", "+PSC", "+NSD", "PAND")
CSV_FIELDS = ("dataset", "student", "method", "no_psc", "lambda_nsd", "nsd_form", "seed",
              "epochs", "best_top1", "last_top1", "best_epoch", "images_per_second", "workdir")


@dataclasses.dataclass(frozen=True)
class Result:
    dataset: str
    student: str
    method: str
    no_psc: bool
    lambda_nsd: float | None   # PAND only
    nsd_form: str
    seed: int
    epochs: int
    best_top1: float
    last_top1: float
    best_epoch: int
    images_per_second: float
    workdir: pathlib.Path

    @property
    def rows(self) -> set[str]:
        """The rows of Tables 1-2 this run fills."""
        return {label for label, method, no_psc, lam in plan.ROWS
                if (method, no_psc) == (self.method, self.no_psc)
                and (self.method != "pand" or no_psc
                     or self.lambda_nsd == (plan.pand_lambda() if lam is None else lam))}


def collect(out: pathlib.Path) -> list[Result]:
    """Every finished Stage-NSD run under OUT/nsd (whatever plan made it)."""
    results = []
    for summary_path in sorted((pathlib.Path(out) / "nsd").rglob("summary.json")):
        workdir = summary_path.parent
        s = json.loads(summary_path.read_text())
        cfg = json.loads((workdir / "config.json").read_text())
        results.append(Result(
            dataset=s["dataset"], student=s["student"], method=s["method"],
            no_psc=bool(s["no_psc"]),
            lambda_nsd=float(s["lambda_nsd"]) if s["method"] == "pand" else None,
            nsd_form=s["nsd_form"], seed=int(cfg["seed"]), epochs=int(s["epochs"]),
            best_top1=s["best_top1"], last_top1=s["last_top1"], best_epoch=s["best_epoch"],
            images_per_second=s["images_per_second"], workdir=workdir))
    return results


def write_csv(results: list[Result], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in results:
            row = dataclasses.asdict(r)
            row["lambda_nsd"] = "" if r.lambda_nsd is None else r.lambda_nsd
            w.writerow(row)


def top1s(results: list[Result], dataset: str, student: str, row: str | None = None,
          lambda_nsd: float | None = None) -> np.ndarray:
    """Best top-1 (%) over seeds of one table cell: a row of Tables 1-2, or a PAND lambda."""
    return np.asarray([100 * r.best_top1 for r in results
                       if (r.dataset, r.student) == (dataset, student)
                       and (row in r.rows if row is not None else
                            (r.method, r.no_psc, r.lambda_nsd) == ("pand", False, lambda_nsd))])


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
    head = [first] + [f"{STUDENT_NAMES.get(s, s)} {c}" for s in students
                      for c in ("ours", "n", "paper", "Δ")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        lines.append("| " + " | ".join([str(label)] + [x for s in students
                                                        for x in cell(label, s)]) + " |")
    return lines


def markdown(results: list[Result]) -> str:
    """The paper's tables for every dataset in `results`."""
    lines = []
    for dataset in sorted({r.dataset for r in results}):
        rs = [r for r in results if r.dataset == dataset]
        students = sorted({r.student for r in rs}, key=lambda s: (s not in STUDENT_NAMES, s))
        epochs = sorted({r.epochs for r in rs})
        forms = sorted({r.nsd_form for r in rs})
        paper = {s: PAPER.get((dataset, s), {}) for s in students}
        lines += [f"# {DATASET_NAMES.get(dataset, dataset)}: ours beside the paper", "",
                  "Top-1 test accuracy (%) at each run's best epoch: mean ± std over seeds (n "
                  "runs); paper: the paper's number (\"-\": not known); Δ = ours − paper. "
                  f"Epochs: {', '.join(map(str, epochs))}; NSD form: {', '.join(forms)}.", ""]
        if dataset in PAPER_BEST_UNKNOWN_STUDENT:
            lines += [f"The paper's best PAND result on this dataset is "
                      f"{PAPER_BEST_UNKNOWN_STUDENT[dataset]:.2f} (the student is not stated).",
                      ""]

        def row_cell(label, s):
            return _cell(top1s(rs, dataset, s, row=label), paper[s].get(label))

        lambdas = sorted({r.lambda_nsd for r in rs if r.method == "pand" and not r.no_psc})

        def lambda_cell(lam, s):
            return _cell(top1s(rs, dataset, s, lambda_nsd=lam),
                         PAPER_LAMBDA.get((dataset, s), {}).get(lam))

        lines += ["## Table 1: PAND against the baselines", ""]
        lines += _table("method", TABLE1, students, row_cell) + [""]
        lines += ["## Table 2: ablation of PSC and NSD", ""]
        lines += _table("method", TABLE2, students, row_cell) + [""]
        lines += ["## Sensitivity to lambda_NSD (PAND)", ""]
        lines += _table("lambda_NSD", [f"{x:g}" for x in lambdas], students,
                        lambda lam, s: lambda_cell(float(lam), s)) + [""]
    return "\n".join(lines)
