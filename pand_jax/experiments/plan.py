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

Row = methods.Row


def paper_method() -> methods.Method:
    """The method whose paper's ablation table and sensitivity study reproduce.py runs (PAND's:
    Table 2 and the lambda_NSD sweep hang off its entry)."""
    return next(m for m in methods.REGISTRY.values() if m.sweep is not None)


def table1() -> tuple[Row, ...]:
    """One row per registered method, in the registry's order (the paper's Table 1, then the
    other systems)."""
    return tuple(m.table_row() for m in methods.REGISTRY.values() if m.in_table)


def ablations() -> tuple[Row, ...]:
    """The ablation table's own rows (its others are Table 1's)."""
    return paper_method().ablations


def ablation_table() -> tuple[str, ...]:
    """The ablation table's row labels, in order."""
    return paper_method().ablation_table


def sweep(values=None) -> tuple[Row, ...]:
    """The sensitivity study's rows at `values` (default: the paper's)."""
    method = paper_method()
    return method.sweep.rows(method.name, values)


def rows(sweep_values=None) -> tuple[Row, ...]:
    return table1() + ablations() + sweep(sweep_values)


# Keys the plan itself sets on every run; changing them with --set would merge rows silently.
PLANNED_KEYS = (
    "dataset",
    "student",
    "method",
    "no_psc",
    "anchors",
    "seed",
    paper_method().sweep.key,
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
    swept = paper_method().sweep
    name = swept.label if key == swept.key else key.rsplit(".", 1)[-1]
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
    """The train.py flags that make the row's run: its method, then its config values."""
    return row_flags(row) + row_sets(row)


def row_flags(row: Row) -> list[str]:
    return ["--method", row.method] + (["--no-psc"] if row.values().get("no_psc") else [])


def row_sets(row: Row) -> list[str]:
    values = {k: v for k, v in row.values().items() if k != "no_psc"}
    return set_args([f"{k}={_set_value(v)}" for k, v in values.items()])


def _set_value(value: Any) -> str:
    """A config value as `--set` reads it (`config.parse_value`): JSON, strings plain."""
    return value if isinstance(value, str) else json.dumps(value)


def distinct_runs(sweep_values=None) -> list[Row]:
    """One row per distinct run of one student and seed, with the runs that read the teacher
    first (so that the first one builds the cache)."""
    unique = {}
    for row in rows(sweep_values):
        unique.setdefault(variant(row), row)
    return sorted(unique.values(), key=lambda r: not methods.get(r.method).reads_clip)


def set_args(sets) -> list[str]:
    return [a for item in sets for a in ("--set", item)]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What reproduce.py asks of the plan."""

    dataset: str
    students: tuple[str, ...]
    seeds: int
    out: pathlib.Path
    teacher_cache: int  # views; 0: every run's teacher online
    epochs: int | None = None
    psc_epochs: int | None = None
    sweep_values: tuple[float, ...] | None = None  # None: the paper's
    psc_sets: tuple[str, ...] = ()
    nsd_sets: tuple[str, ...] = ()
    teacher: str | None = None
    data_dir: str | None = None

    def common(self) -> list[str]:
        """The flags of every run."""
        argv = ["--dataset", self.dataset] + (["--teacher", self.teacher] if self.teacher else [])
        return argv + (["--data-dir", self.data_dir] if self.data_dir else [])


def plan(s: Settings) -> list[Run]:
    """Stage-PSC, then every Stage-NSD run, in dependency order (see `first_wave`)."""
    psc_dir = s.out / "psc"
    psc_argv = ["--stage", "psc", *s.common(), "--workdir", str(psc_dir)]
    psc_argv += (["--epochs", str(s.psc_epochs)] if s.psc_epochs else []) + set_args(s.psc_sets)
    runs = [Run("psc", tuple(psc_argv), psc_dir, (), builds_cache=False, prerequisite=True)]
    builders, its, rest = [], [], []
    rows = distinct_runs(s.sweep_values)
    wants_it = any(methods.get(r.method).teacher == methods.INTERMEDIATE for r in rows)
    for seed in range(s.seeds):
        if wants_it:  # one IT per seed (its architecture is configs' it_student), every student's
            it = methods.get(methods.IT_METHOD)
            argv = ["--stage", "it"]
            its.append(_stage_run(s, it, argv, name=f"it seed {seed}", seed=seed, prior=True))
        for student in s.students:
            for row in rows:
                # a row with its own augmentation builds its own cache, not the shared one
                first = methods.get(row.method).reads_clip and s.teacher_cache > 0
                first = first and _own_augment(row) is None
                run = _nsd_run(s, row, student, seed, first=first and len(builders) == seed)
                (builders if run.builds_cache else rest).append(run)
    return runs + builders + its + rest


def _nsd_run(s: Settings, row: Row, student: str, seed: int, *, first: bool) -> Run:
    """The Stage-NSD run of `row` for `student` and `seed`; the `first` of its seed that reads
    the teacher builds the seed's cache."""
    method, name = methods.get(row.method), variant(row)
    argv = ["--stage", "nsd", "--student", student, *row_flags(row)]
    requires = ()
    if method.teacher == methods.INTERMEDIATE:
        argv += ["--intermediate-teacher", str(_it_dir(s, seed))]
        requires = (f"it seed {seed}",)
    workdir = s.out / "nsd" / student_label(student) / f"seed{seed}" / name
    return _stage_run(
        s,
        method,
        argv,
        name=f"{student} seed {seed} {name}",
        seed=seed,
        workdir=workdir,
        first=first,
        requires=requires,
        row=row,
    )


def _it_dir(s: Settings, seed: int) -> pathlib.Path:
    return s.out / "it" / f"seed{seed}"


def _stage_run(
    s: Settings,
    method: methods.Method,
    stage_argv: list[str],
    *,
    name: str,
    seed: int,
    workdir: pathlib.Path | None = None,
    first: bool = False,
    requires: tuple[str, ...] = (),
    prior: bool = False,
    row: Row | None = None,
) -> Run:
    """A Stage-NSD (or --stage it, `prior`: a prerequisite) run of `method` (of a table's
    `row`): its anchors, teacher cache and seed. A row that sets its own augmentation has views
    of its own, so it keeps a cache of its own (`seedS-RECIPE`)."""
    workdir = workdir or _it_dir(s, seed)
    learned = method.wants_learned_anchors("--no-psc" in stage_argv)
    argv = [*stage_argv, *s.common()]
    argv += ["--anchors", str(s.out / "psc" / "anchors.npz")] if learned else []
    if method.reads_clip:
        recipe = _own_augment(row)
        cache_dir = s.out / "teacher_cache" / (f"seed{seed}-{recipe}" if recipe else f"seed{seed}")
        argv += ["--teacher-cache", str(s.teacher_cache), "--set", f"teacher_cache_dir={cache_dir}"]
    argv += ["--epochs", str(s.epochs)] if s.epochs else []
    argv += ["--set", f"seed={seed}", "--set", f"host_cache_dir={s.out / 'host_cache'}"]
    # The row's own values last: they define the row, over the demo's or the user's --set (a
    # row's augmentation, say, over the demo's).
    argv += ["--workdir", str(workdir), *set_args(s.nsd_sets), *(row_sets(row) if row else [])]
    requires = ("psc",) * learned + requires
    return Run(name, tuple(argv), workdir, requires, first, prerequisite=first or prior)


def _own_augment(row: Row | None) -> str | None:
    """The augmentation a table row sets itself (function matching's mixup), or None."""
    return row.values().get("augment") if row else None


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
