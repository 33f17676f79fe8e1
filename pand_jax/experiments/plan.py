"""The paper's experiments as a list of `train.py` command lines.

Every run of Tables 1-2 and of the lambda_NSD sensitivity study is one plain `train.py` argv,
so `reproduce.py --list` prints exactly what `reproduce.py` runs. A row of the paper is a
(method, no_psc, lambda_NSD) setting; rows that name the same setting (lambda 0 of the sweep
is "+PSC", PAND's own lambda is "PAND") are one run.

Layout under OUT:
    psc/                                      Stage-PSC, once (seed 0): anchors.npz
    teacher_cache/seed{S}/                    the teacher cache every Stage-NSD run of seed S reads
    host_cache/                               decoded images, shared by every Stage-NSD run
    nsd/{student}/seed{S}/{variant}/          one Stage-NSD run
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from pand_jax import config as config_lib

# The paper's sensitivity study of lambda_NSD (CUB, ResNet-18).
SWEEP_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Tables 1-2, in the paper's order: (label, method, no_psc, lambda_nsd or None for PAND's).
ROWS = (
    ("no KD", "none", False, None),
    ("KD", "kd", False, None),
    ("RKD", "rkd", False, None),
    ("VL2Lite", "vl2lite", False, None),
    ("+PSC", "pand", False, 0.0),
    ("+NSD", "pand", True, None),
    ("PAND", "pand", False, None),
)
# Keys the plan itself sets on every run; changing them with --set would merge rows silently.
PLANNED_KEYS = ("dataset", "student", "method", "no_psc", "anchors", "seed", "loss.lambda_nsd",
                "teacher", "teacher_cache", "teacher_cache_dir", "host_cache_dir", "epochs",
                "stage")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str            # for messages: "psc" or "resnet18 seed 0 pand-lambda0.5"
    argv: tuple[str, ...]
    workdir: pathlib.Path
    needs_psc: bool      # reads the anchors Stage-PSC writes
    builds_cache: bool   # the first run of its seed that reads the teacher cache: it builds it


def pand_lambda() -> float:
    """PAND's lambda_NSD: the paper's default in configs/nsd.json."""
    return float(config_lib.default_config("nsd")["loss"]["lambda_nsd"])


def variant(method: str, no_psc: bool, lambda_nsd: float) -> str:
    """The run's folder name; the same for rows that are the same run."""
    if method != "pand":
        return method
    return "pand-nopsc" if no_psc else f"pand-lambda{lambda_nsd:g}"


def row_settings(lambdas=SWEEP_LAMBDAS) -> list[tuple[str, bool, float]]:
    """(method, no_psc, lambda_nsd) of every distinct run of one student and seed, with the runs
    that read the teacher first (so that the first one builds the cache)."""
    settings = []
    for _, method, no_psc, lam in ROWS:
        settings.append((method, no_psc, pand_lambda() if lam is None else lam))
    settings += [("pand", False, float(lam)) for lam in lambdas]
    unique = list(dict.fromkeys((m, n, lam if m == "pand" else None) for m, n, lam in settings))
    return sorted(unique, key=lambda s: s[0] == "none")  # stable: the paper's order otherwise


def set_args(sets: list[str]) -> list[str]:
    return [a for item in sets for a in ("--set", item)]


def plan(*, dataset: str, students: list[str], seeds: int, out: pathlib.Path,
         teacher_cache: int, epochs: int | None = None, psc_epochs: int | None = None,
         lambdas=SWEEP_LAMBDAS, psc_sets: tuple[str, ...] = (), nsd_sets: tuple[str, ...] = (),
         teacher: str | None = None, data_dir: str | None = None) -> list[Run]:
    """Stage-PSC, then every Stage-NSD run, in dependency order (see `first_wave`)."""
    out = pathlib.Path(out)
    common = ["--dataset", dataset] + (["--teacher", teacher] if teacher else [])
    common += ["--data-dir", data_dir] if data_dir else []
    psc_dir = out / "psc"
    psc_argv = ["--stage", "psc", *common, "--workdir", str(psc_dir)]
    psc_argv += (["--epochs", str(psc_epochs)] if psc_epochs else []) + set_args(list(psc_sets))
    runs = [Run("psc", tuple(psc_argv), psc_dir, needs_psc=False, builds_cache=False)]
    builders, rest = [], []
    for seed in range(seeds):
        cache_dir = out / "teacher_cache" / f"seed{seed}"
        for student in students:
            for method, no_psc, lam in row_settings(lambdas):
                name = variant(method, no_psc, lam)
                workdir = out / "nsd" / student / f"seed{seed}" / name
                argv = ["--stage", "nsd", *common, "--student", student, "--method", method]
                if method == "pand":
                    argv += ["--lambda-nsd", f"{lam:g}"]
                    argv += ["--no-psc"] if no_psc else ["--anchors", str(psc_dir / "anchors.npz")]
                if method != "none":
                    argv += ["--teacher-cache", str(teacher_cache),
                             "--set", f"teacher_cache_dir={cache_dir}"]
                argv += (["--epochs", str(epochs)] if epochs else [])
                argv += ["--set", f"seed={seed}", "--set", f"host_cache_dir={out / 'host_cache'}",
                         "--workdir", str(workdir)]
                argv += set_args(list(nsd_sets))
                first = method != "none" and teacher_cache > 0 and len(builders) == seed
                run = Run(f"{student} seed {seed} {name}", tuple(argv), workdir,
                          needs_psc=method == "pand" and not no_psc, builds_cache=first)
                (builders if first else rest).append(run)
    return runs + builders + rest


def first_wave(runs: list[Run]) -> int:
    """How many leading runs the others depend on (Stage-PSC and one cache builder per seed);
    the runs after them are independent of each other."""
    return 1 + sum(r.builds_cache for r in runs)


def is_finished(workdir: pathlib.Path, cfg: dict) -> bool:
    """A run is finished when it wrote its summary for this config (keys added to the config
    since then count as their defaults, as when resuming)."""
    try:
        recorded = config_lib.with_defaults(json.loads((workdir / "config.json").read_text()),
                                            config_lib.default_config(cfg["stage"]))
        same = recorded == json.loads(json.dumps(cfg))
    except (OSError, ValueError):
        return False
    return same and (workdir / "summary.json").is_file()
