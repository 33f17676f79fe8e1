"""The paper's experiments as a list of `train.py` command lines.

Every run of Tables 1-2 and of the lambda_NSD sensitivity study is one plain `train.py` argv,
so `reproduce.py --list` prints exactly what `reproduce.py` runs. Table 1 has a row per method
of the registry (`pand_jax.methods`); a row is a method and the config values that make it;
rows that name the same setting (lambda 0 of the sweep is "+PSC", PAND's own lambda is "PAND")
are one run.

Layout under OUT:
    psc/                                      Stage-PSC, once (seed 0): anchors.npz
    teacher_cache/seed{S}/                    the teacher cache every Stage-NSD run of seed S reads
    it/seed{S}/                               DAIT's intermediate teacher of seed S (--stage it)
    host_cache/                               decoded images, shared by every Stage-NSD run
    nsd/{student}/seed{S}/{variant}/          one Stage-NSD run
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from pand_jax import config as config_lib
from pand_jax import methods
from pand_jax.models.student import student_label

# The paper's sensitivity study of lambda_NSD (CUB, ResNet-18).
SWEEP_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAMBDA_KEY = "loss.pand.lambda_nsd"


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the tables: a method and the config values that make it (a value of None is
    configs/nsd.json's, named so that the sweep's run at that value is the same run)."""

    label: str
    method: str
    sets: tuple[tuple[str, Any], ...] = ()

    def values(self) -> dict[str, Any]:
        return {k: default_value(k) if v is None else v for k, v in self.sets}


def default_value(key: str) -> Any:
    node = config_lib.default_config("nsd")
    for part in key.split("."):
        node = node[part]
    return node


def table1() -> tuple[Row, ...]:
    """One row per registered method, in the registry's (the paper's Table 1) order."""
    return tuple(
        Row(m.label, m.name, m.table_sets) for m in methods.REGISTRY.values() if m.in_table
    )


# Table 2, the paper's ablation of PSC and NSD: VL2Lite and PAND rows of Table 1 between them.
ABLATIONS = (
    Row("+PSC", "pand", (("no_psc", False), (LAMBDA_KEY, 0.0))),
    Row("+NSD", "pand", (("no_psc", True),)),
)
TABLE2 = ("VL2Lite", "+PSC", "+NSD", "PAND")


def sweep(lambdas) -> tuple[Row, ...]:
    return tuple(
        Row(f"lambda {lam:g}", "pand", (("no_psc", False), (LAMBDA_KEY, float(lam))))
        for lam in lambdas
    )


def rows(lambdas=SWEEP_LAMBDAS) -> tuple[Row, ...]:
    return table1() + ABLATIONS + sweep(lambdas)


# Keys the plan itself sets on every run; changing them with --set would merge rows silently.
PLANNED_KEYS = (
    "dataset",
    "student",
    "method",
    "no_psc",
    "anchors",
    "seed",
    LAMBDA_KEY,
    "teacher",
    "teacher_cache",
    "teacher_cache_dir",
    "host_cache_dir",
    "epochs",
    "stage",
)


def _suffix(key: str, value: Any) -> str:
    """How a row's config value shows in its run's folder name."""
    if key == "no_psc":
        return "-nopsc" if value else ""
    name = "lambda" if key == LAMBDA_KEY else key.rsplit(".", 1)[-1]
    return f"-{name}{value:g}" if isinstance(value, float) else f"-{name}{value}"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # for messages: "psc" or "resnet18 seed 0 pand-lambda0.5"
    argv: tuple[str, ...]
    workdir: pathlib.Path
    requires: tuple[str, ...]  # the runs whose output it reads (Stage-PSC's anchors, an IT)
    builds_cache: bool  # the first run of its seed that reads the teacher cache: it builds it
    prerequisite: bool = False  # other runs read its output: it is in the first wave


def variant(row: Row) -> str:
    """The run's folder name; the same for rows that are the same run."""
    values = row.values()
    return row.method + "".join(_suffix(k, values[k]) for k in sorted(values, reverse=True))


def row_argv(row: Row) -> list[str]:
    values = row.values()
    argv = ["--method", row.method] + (["--no-psc"] if values.pop("no_psc", False) else [])
    return argv + set_args([f"{k}={v!r}" for k, v in values.items()])


def distinct_runs(lambdas=SWEEP_LAMBDAS) -> list[Row]:
    """One row per distinct run of one student and seed, with the runs that read the teacher
    first (so that the first one builds the cache)."""
    unique = {}
    for row in rows(lambdas):
        unique.setdefault(variant(row), row)
    return sorted(unique.values(), key=lambda r: not methods.get(r.method).reads_clip)


def set_args(sets: list[str]) -> list[str]:
    return [a for item in sets for a in ("--set", item)]


def plan(
    *,
    dataset: str,
    students: list[str],
    seeds: int,
    out: pathlib.Path,
    teacher_cache: int,
    epochs: int | None = None,
    psc_epochs: int | None = None,
    lambdas=SWEEP_LAMBDAS,
    psc_sets: tuple[str, ...] = (),
    nsd_sets: tuple[str, ...] = (),
    teacher: str | None = None,
    data_dir: str | None = None,
) -> list[Run]:
    """Stage-PSC, then every Stage-NSD run, in dependency order (see `first_wave`)."""
    out = pathlib.Path(out)
    common = ["--dataset", dataset] + (["--teacher", teacher] if teacher else [])
    common += ["--data-dir", data_dir] if data_dir else []
    psc_dir = out / "psc"
    psc_argv = ["--stage", "psc", *common, "--workdir", str(psc_dir)]
    psc_argv += (["--epochs", str(psc_epochs)] if psc_epochs else []) + set_args(list(psc_sets))
    runs = [
        Run("psc", tuple(psc_argv), psc_dir, requires=(), builds_cache=False, prerequisite=True)
    ]
    builders, its, rest = [], [], []

    def stage_run(name, method, stage_argv, workdir, seed, first=False, requires=()):
        """A Stage-NSD (or --stage it) run of `method`: its anchors, teacher cache and seed."""
        learned = method.wants_learned_anchors("--no-psc" in stage_argv)
        argv = [*stage_argv, *common]
        argv += ["--anchors", str(psc_dir / "anchors.npz")] if learned else []
        if method.reads_clip:
            argv += [
                "--teacher-cache",
                str(teacher_cache),
                "--set",
                f"teacher_cache_dir={out / 'teacher_cache' / f'seed{seed}'}",
            ]
        argv += ["--epochs", str(epochs)] if epochs else []
        argv += [
            "--set",
            f"seed={seed}",
            "--set",
            f"host_cache_dir={out / 'host_cache'}",
            "--workdir",
            str(workdir),
        ]
        argv += set_args(list(nsd_sets))
        return Run(
            name,
            tuple(argv),
            workdir,
            requires=("psc",) * learned + requires,
            builds_cache=first,
            prerequisite=first,
        )

    wants_it = any(
        methods.get(r.method).teacher == methods.INTERMEDIATE for r in distinct_runs(lambdas)
    )
    for seed in range(seeds):
        it_dir = out / "it" / f"seed{seed}"
        if wants_it:  # one IT per seed (its architecture is configs' it_student), every student's
            its.append(
                dataclasses.replace(
                    stage_run(
                        f"it seed {seed}",
                        methods.get(methods.IT_METHOD),
                        ["--stage", "it"],
                        it_dir,
                        seed,
                    ),
                    prerequisite=True,
                )
            )
        for student in students:
            for row in distinct_runs(lambdas):
                method, name = methods.get(row.method), variant(row)
                argv = ["--stage", "nsd", "--student", student, *row_argv(row)]
                requires = ()
                if method.teacher == methods.INTERMEDIATE:
                    argv += ["--intermediate-teacher", str(it_dir)]
                    requires = (f"it seed {seed}",)
                first = method.reads_clip and teacher_cache > 0 and len(builders) == seed
                run = stage_run(
                    f"{student} seed {seed} {name}",
                    method,
                    argv,
                    out / "nsd" / student_label(student) / f"seed{seed}" / name,
                    seed,
                    first,
                    requires,
                )
                (builders if first else rest).append(run)
    return runs + builders + its + rest


def first_wave(runs: list[Run]) -> int:
    """How many leading runs the others depend on (Stage-PSC, one cache builder per seed, and
    DAIT's intermediate teachers); the runs after them are independent of each other."""
    return sum(r.prerequisite for r in runs)


def is_finished(workdir: pathlib.Path, cfg: dict) -> bool:
    """A run is finished when it wrote its summary for this config (keys added to the config
    since then count as their defaults, as when resuming)."""
    try:
        same = config_lib.recorded_config(workdir, cfg["stage"]) == json.loads(json.dumps(cfg))
    except (OSError, ValueError):
        return False
    return same and (workdir / "summary.json").is_file()
