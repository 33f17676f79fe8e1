"""`python reproduce.py`: the paper's Tables 1-2, the lambda_NSD sweep and Figure 3 in one
command, our numbers beside the paper's.

Stage-PSC runs once, each seed's teacher cache is built once, then every Stage-NSD run (no KD,
KD, RKD, VL2Lite, +PSC, +NSD, PAND and the lambda_NSD sweep, for each student and seed) runs in
this process. Finished runs are skipped, a failed run is reported and the others go on, and
running the same command again resumes everything. OUT gets results.csv, results.md and
figures/. `--list` prints the plan as plain `train.py` commands for a cluster's scheduler;
`--collect` only gathers the runs that exist.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import sys
import traceback

from pand_jax import config as config_lib
from pand_jax import devices, files
from pand_jax.cli import common
from pand_jax.data import datasets
from pand_jax.experiments import plan as plan_lib
from pand_jax.models import clip_student
from pand_jax.models.student import ARCHS

DEMO = config_lib.demo_config()["reproduce"]  # --demo's scale: minutes on a CPU


def parser() -> common.Parser:
    p = common.Parser(
        prog="reproduce.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python reproduce.py --dataset cub --data-dir data\n"
        "  python reproduce.py --dataset cub --list > plan.txt   # run it your way, then\n"
        "  python reproduce.py --dataset cub --collect\n"
        "  python reproduce.py --demo   # offline, digits and the demo teacher",
    )
    p.add_argument(
        "--dataset",
        help="cub, aircraft, pets, dogs (the paper's), cars, flowers, "
        "food, or folder:PATH (see train.py --help)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="everything on digits with the demo teacher (made if missing), on a CPU",
    )
    p.add_argument(
        "--students",
        help=f"comma-separated, from {', '.join(ARCHS)}, clip:DIR "
        f"(default: all; --demo: {','.join(DEMO['students'])})",
    )
    p.add_argument("--seeds", type=int, help=f"seeds 0..N-1 (default 3; --demo: {DEMO['seeds']})")
    p.add_argument(
        "--epochs",
        type=int,
        help="Stage-NSD epochs of every run (default: "
        f"configs/nsd.json, the paper's 300; --demo: {DEMO['epochs']})",
    )
    p.add_argument("--psc-epochs", type=int, help="Stage-PSC epochs (default: configs/psc.json)")
    _add_run_flags(p)
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    method = plan_lib.paper_method()
    p.add_argument(
        "--lambdas",
        default=",".join(f"{x:g}" for x in method.sweep.values),
        help=f"the {method.sweep.symbol} sweep for {method.label} (default: the paper's "
        "%(default)s)",
    )
    p.add_argument(
        "--teacher-cache",
        type=int,
        default=8,
        metavar="V",
        help="views per training image in the teacher cache every Stage-NSD run of "
        "a seed shares (0: teacher online in every run; default %(default)s)",
    )
    p.add_argument("--teacher", help="converted teacher weights (default: weights/teacher)")
    p.add_argument("--data-dir", help="prepared datasets (python -m pand_jax.data.prepare)")
    p.add_argument("--out", help="output folder (default: runs/reproduce/DATASET)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value in every run whose stage has KEY",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--list",
        action="store_true",
        help="print the plan as train.py commands, in dependency order, and exit",
    )
    mode.add_argument(
        "--collect",
        action="store_true",
        help="only gather the finished runs into results.csv, results.md, figures/",
    )


def split_sets(sets: list[str]) -> tuple[list[str], list[str]]:
    """(PSC sets, NSD sets): each `--set` goes to the stages whose config has its key."""
    by_stage = {"psc": [], "nsd": []}
    for item in sets:
        key = item.partition("=")[0].strip()
        key = config_lib.canonical_key(key)
        if "=" not in item:
            raise config_lib.ConfigError(f"--set expects key=value, got {item!r}")
        if key in plan_lib.PLANNED_KEYS:
            raise config_lib.ConfigError(
                f"--set {key}=... is set by the plan itself; use reproduce.py's own options "
                "(--dataset, --students, --seeds, --epochs, --psc-epochs, --lambdas, "
                "--teacher, --teacher-cache)"
            )
        errors = []
        for stage, items in by_stage.items():
            try:
                config_lib.apply_sets(config_lib.default_config(stage), [item])
                items.append(item)
            except config_lib.ConfigError as e:
                errors.append(str(e))
        if len(errors) == len(by_stage):
            raise config_lib.ConfigError(f"--set {item}: neither stage has it ({errors[-1]})")
    return by_stage["psc"], by_stage["nsd"]


def demo_sets() -> tuple[dict, list[str], list[str]]:
    """(demo config, PSC sets, NSD sets): configs/demo.json's stage sections as --set items."""
    d = config_lib.demo_config()

    def items(section):
        return [
            f"{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in config_lib.flatten(d[section])
            if k not in plan_lib.PLANNED_KEYS
        ]

    return d, items("psc"), items("nsd")


def make_plan(args) -> tuple[list[plan_lib.Run], pathlib.Path]:
    students = _students(args)
    seeds = args.seeds if args.seeds is not None else (DEMO["seeds"] if args.demo else 3)
    if seeds < 1:
        raise config_lib.ConfigError(f"--seeds must be at least 1, got {seeds}")
    sweep_values = _sweep_values(args.lambdas)
    if args.teacher_cache < 0:
        raise config_lib.ConfigError(f"--teacher-cache must be >= 0, got {args.teacher_cache}")
    psc_sets, nsd_sets = split_sets(args.set)
    epochs, psc_epochs, teacher = args.epochs, args.psc_epochs, args.teacher
    if args.demo:
        dataset = "digits"
        d, demo_psc, demo_nsd = demo_sets()
        demo_nsd.append(f"max_steps_per_epoch={DEMO['max_steps_per_epoch']}")
        psc_sets, nsd_sets = demo_psc + psc_sets, demo_nsd + nsd_sets  # the user's win
        epochs, psc_epochs = epochs or DEMO["epochs"], psc_epochs or d["psc"]["epochs"]
    elif args.dataset:
        dataset = args.dataset
        datasets.get_dataset(dataset)  # an unknown name fails here, listing the known ones
    else:
        raise config_lib.ConfigError(
            "give --dataset NAME (cub, aircraft, pets, dogs, ...), or --demo"
        )
    name = "demo" if args.demo else datasets.run_name(dataset)
    out = pathlib.Path(args.out or pathlib.Path("runs") / "reproduce" / name)
    settings = plan_lib.Settings(
        dataset=dataset,
        students=students,
        seeds=seeds,
        out=out,
        teacher_cache=args.teacher_cache,
        epochs=epochs,
        psc_epochs=psc_epochs,
        sweep_values=sweep_values,
        psc_sets=tuple(psc_sets),
        nsd_sets=tuple(nsd_sets),
        teacher=teacher or (str(out / "teacher") if args.demo else None),
        data_dir=args.data_dir,
    )
    return plan_lib.plan(settings), out


def _students(args) -> tuple[str, ...]:
    students = (
        args.students.split(",") if args.students else DEMO["students"] if args.demo else ARCHS
    )
    bad = [s for s in students if s not in ARCHS and not clip_student.is_clip(s)]
    if bad:
        raise config_lib.ConfigError(
            f"unknown student {bad[0]!r} in --students; expected a "
            f"comma-separated list from {list(ARCHS)} or clip:DIR"
        )
    return tuple(students)


def _sweep_values(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise config_lib.ConfigError(
            f"--lambdas expects comma-separated numbers, got {text!r}"
        ) from None


def print_plan(runs: list[plan_lib.Run], demo: bool) -> None:
    for run in runs:
        print(shlex.join(["python", "train.py", *run.argv]))
    wave = plan_lib.first_wave(runs)
    note = (
        f"# {len(runs)} commands. The first {wave} (Stage-PSC, one run per seed that builds "
        "that seed's teacher cache, and DAIT's intermediate teachers, which read those caches) "
        f"run in this order and must finish before the other {len(runs) - wave}, which are "
        "independent of each other. Then: python reproduce.py ... --collect"
    )
    if demo:
        note += "\n# The demo teacher is trained by python reproduce.py --demo when missing."
    print(note, file=sys.stderr)


def run_all(runs: list[plan_lib.Run]) -> tuple[int, int, list[tuple[str, str]]]:
    """Runs every unfinished run in this process; returns (ran, skipped, [(name, error)])."""
    from pand_jax.cli import train as train_cli
    from pand_jax.progress import progress_bar

    todo, failed, skipped = [], [], 0
    for run in runs:
        try:
            cfg, workdir, info = train_cli.resolve(train_cli.parser().parse_args(list(run.argv)))
        except config_lib.ConfigError as e:
            failed.append((run.name, str(e)))
            continue
        if plan_lib.is_finished(workdir, cfg):
            skipped += 1
        else:
            todo.append((run, cfg, workdir, info))
    if skipped:
        print(f"[reproduce] {skipped} of {len(runs)} runs already finished: skipped", flush=True)
    bar = progress_bar(total=len(todo), desc="reproduce", unit="run", position=0)
    ran = 0
    for run, cfg, workdir, info in todo:
        bar.set_postfix_str(run.name)
        missing = [name for name, _ in failed if name in run.requires]
        if missing:
            failed.append((run.name, f"needs the output of {missing[0]}, which failed"))
        else:
            try:
                summary = train_cli.run_stage(cfg, workdir, info=info)
                ran += 1
                bar.write(
                    f"[reproduce] {run.name}: best top-1 "
                    f"{100 * summary['best_top1']:.2f}% ({workdir})"
                )
            except Exception as e:  # one failed run must not stop the others
                if os.environ.get("PAND_DEBUG"):
                    traceback.print_exc()
                failed.append((run.name, f"{type(e).__name__}: {e}"))
                bar.write(f"[reproduce] FAILED {run.name}: {type(e).__name__}: {e}")
        bar.update(1)
    bar.close()
    return ran, skipped, failed


def gather(out: pathlib.Path) -> bool:
    """results.csv, results.md and figures/ from the finished runs under OUT."""
    from pand_jax.experiments import figures, results

    found = results.collect(out)
    if not found:
        print(f"error: no finished Stage-NSD runs under {out / 'nsd'}", file=sys.stderr)
        return False
    table = results.markdown(found)
    # Each file whole or not at all, and a disk that refuses one is one line naming it (the
    # CSV holds the markdown's rows and columns: its size is about the table's).
    with (
        files.disk_full_errors(out / "results.csv", len(table), "the results table"),
        files.atomic_path(out / "results.csv") as tmp,
    ):
        results.write_csv(found, tmp)
    files.write_file(out / "results.md", table + "\n", "the results table")
    made = figures.make_figures(found, out)
    print(table)
    print(
        f"[reproduce] {len(found)} runs -> {out / 'results.csv'}, {out / 'results.md'}, "
        + ", ".join(str(p) for p in made)
    )
    return True


def ensure_demo_teacher(path: pathlib.Path) -> None:
    from pand_jax.train import demo

    if not (path / "config.json").is_file():
        acc = demo.train_teacher(config_lib.demo_config()["teacher"], path)
        print(f"[reproduce] demo teacher trained: zero-shot top-1 {100 * acc:.1f}%", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def reproduce():
        runs, out = make_plan(args)
        if args.list:  # stdout is the plan, one command per line
            print_plan(runs, args.demo)
            return 0
        devices.report_devices()
        failed = []
        if not args.collect:
            if args.demo:
                ensure_demo_teacher(pathlib.Path(args.teacher or out / "teacher"))
            ran, skipped, failed = run_all(runs)
            print(
                f"[reproduce] {ran} runs done, {skipped} skipped (finished before), "
                f"{len(failed)} failed",
                flush=True,
            )
            for name, error in failed:
                print(f"[reproduce] failed: {name}: {error}", file=sys.stderr)
        return 0 if gather(out) and not failed else 1

    return common.run(reproduce)
