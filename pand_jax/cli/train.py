"""`python train.py`: Stage-PSC, Stage-NSD and the offline demo.

Values come from configs/{psc,nsd}.json (the paper's defaults), then the flags below, then any
`--set dotted.key=value`. The resolved config is checked (`pand_jax.config.validate`) before
any work and written to the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib

from pand_jax import config as config_lib
from pand_jax import methods, soft_labels
from pand_jax.cli import common
from pand_jax.data.datasets import DatasetInfo, get_dataset, run_name
from pand_jax.models import clip_student
from pand_jax.models.student import ARCHS, student_label


def _dest(flag: str) -> str:
    """argparse's attribute name of a flag."""
    return flag.removeprefix("--").replace("-", "_")


# Flag -> config key; None values (flag not given) leave the config alone. The methods' own
# flags (`Method.flags`) are added to it.
FLAG_KEYS = {
    "dataset": "dataset",
    "data_dir": "data_dir",
    "teacher": "teacher",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "student": "student",
    "method": "method",
    "anchors": "anchors",
    "teacher_cache": "teacher_cache",
    "skip_bad_images": "skip_bad_images",
    "unlabeled_data": "unlabeled_data",
    "intermediate_teacher": "intermediate_teacher",
    **{_dest(f.name): f.key for f in methods.flags()},
}
NSD_ONLY = (
    "student",
    "method",
    "anchors",
    "no_psc",
    "teacher_cache",
    "unlabeled_data",
    "soft_labels",
    "intermediate_teacher",
    "recipe",
    *(_dest(f.name) for f in methods.flags()),
)


def parser() -> common.Parser:
    p = common.Parser(
        prog="train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python train.py --stage psc --dataset aircraft\n"
        "  python train.py --stage nsd --dataset aircraft --student mobilenet_v2\n"
        "  python train.py --demo",
    )
    p.add_argument(
        "--stage",
        choices=("psc", "nsd", "it"),
        help="it: DAIT's intermediate teacher (a Stage-NSD run of its own method, "
        "--student default: config it_student, mobilenet_v2)",
    )
    p.add_argument("--demo", action="store_true", help="offline demo: tiny CLIP, digits, PSC+NSD")
    # configs/demo.json's teacher section is the ConvNeXt one; teacher_variants holds the others.
    p.add_argument(
        "--demo-teacher",
        default="convnext",
        choices=("convnext", *config_lib.demo_config()["teacher_variants"]),
        help="--demo: the tiny teacher's image tower (default %(default)s)",
    )
    _add_data_flags(p)
    _add_method_flags(p)
    _add_run_flags(p)
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        help="cub, aircraft, pets, dogs, cars, flowers, food, digits, or "
        "folder:PATH for your own images (PATH/train/<class>/*.jpg, PATH/test/...)",
    )
    p.add_argument("--data-dir", help="prepared datasets (python -m pand_jax.data.prepare)")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="folder datasets: leave out unreadable images (listed in the workdir)",
    )
    p.add_argument(
        "--unlabeled-data",
        metavar="folder:DIR",
        help="Stage-NSD: more training images, in any layout, without labels (for a "
        f"method that reads none: {', '.join(methods.names(lambda m: not m.reads_labels))})",
    )
    p.add_argument("--teacher", help="converted teacher weights (default: weights/teacher)")
    p.add_argument(
        "--student",
        metavar="|".join(ARCHS) + "|clip:DIR",
        help="the student: a torchvision backbone, or clip:DIR, the image tower of "
        "the converted ViT CLIP in DIR with visual prompts (docs/students.md)",
    )


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        choices=methods.NAMES,
        help="the Stage-NSD method (docs/methods.md); label-free: "
        f"{', '.join(methods.names(lambda m: not m.reads_labels and m.in_table))}",
    )
    p.add_argument(
        "--recipe",
        metavar="NAME",
        help="a released recipe of configs/recipes/ (promptkd_clip, fdbpl_clip: "
        "the CLIP-student settings), under the other flags and --set",
    )
    for flag in methods.flags():
        p.add_argument(flag.name, type=flag.type, choices=flag.choices, help=f"--set {flag.key}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--anchors", help="anchors.npz from Stage-PSC (default: runs/DATASET/psc/)")
    g.add_argument("--no-psc", action="store_true", help="template anchors (ablation +NSD only)")
    p.add_argument(
        "--teacher-cache",
        type=int,
        metavar="V",
        help="Stage-NSD: precompute the teacher on V augmented views (0: online)",
    )
    p.add_argument(
        "--soft-labels",
        metavar="KIND[:K]",
        help="Stage-NSD with --teacher-cache: store the teacher's top-K class "
        "probabilities instead of its embedding (FKD): embedding (default), ms, mr, hard, "
        f"ms:K, mr:K (for {', '.join(methods.names(lambda m: m.teacher_distribution))})",
    )
    p.add_argument(
        "--intermediate-teacher",
        metavar="DIR",
        help="DAIT: the intermediate teacher (train.py --stage it's folder)",
    )


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    # --out DIR names the output folder of every command; --workdir is its earlier spelling.
    p.add_argument(
        "--out",
        "--workdir",
        dest="workdir",
        metavar="DIR",
        help="the run's folder (default: runs/DATASET/STAGE[...]; --workdir too)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set optimizer.grad_clip=1.0",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a workdir even though its recorded config differs",
    )
    p.add_argument("--coordinator", help="multi-process: coordinator host:port (process 0)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)


@functools.cache
def schema_facts() -> config_lib.Facts:
    """What the config schema checks against: this run's mesh, the datasets, the choices and
    the methods' sections and rules."""
    import jax

    from pand_jax.data.augment import RECIPES
    from pand_jax.devices import DTYPE_NAMES, TEACHER_SHARDINGS
    from pand_jax.train.teacher_cache import DTYPES

    return config_lib.Facts(
        devices=len(jax.devices()),
        processes=jax.process_count(),
        num_classes=functools.cache(lambda key: get_dataset(key).num_classes),
        choices=dict(
            dtype=DTYPE_NAMES,
            student=ARCHS,
            method=methods.NAMES,
            augment=RECIPES,
            teacher_cache_dtype=tuple(DTYPES),
            soft_labels=soft_labels.KINDS,
            it_student=ARCHS,
            teacher_sharding=TEACHER_SHARDINGS,
            student_train=clip_student.TRAIN,
        ),
        loss_sections=methods.loss_sections(),
        method_rule=methods.rule,
    )


def resolve(args: argparse.Namespace) -> tuple[dict, pathlib.Path, DatasetInfo]:
    """The checked config for args.stage, its workdir and its dataset, resolved once (an image
    folder is scanned here, and the run reads this scan)."""
    stage = args.stage
    if stage == "it":  # a Stage-NSD run of DAIT's first-stage method
        if args.method:
            raise config_lib.ConfigError(
                "--method applies to --stage nsd; --stage it trains DAIT's intermediate teacher"
            )
        return _resolve_it(args)
    if stage == "psc":
        given = [f for f in NSD_ONLY if getattr(args, f) not in (None, False)]
        if given:
            raise config_lib.ConfigError(
                f"--{given[0].replace('_', '-')} applies to --stage nsd only"
            )
    cfg = config_lib.default_config(stage)
    if stage == "nsd" and args.recipe:  # before the flags, which override it
        cfg = config_lib.apply_recipe(cfg, args.recipe)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None and (stage == "nsd" or flag not in NSD_ONLY):
            config_lib.override(cfg, key, value)
    if args.no_psc:
        cfg["no_psc"] = True
    if args.soft_labels and stage == "nsd":  # KIND[:K] sets two keys (hard's K is 1)
        kind, k = soft_labels.parse(args.soft_labels, cfg["soft_labels_k"])
        cfg["soft_labels"] = kind
        if kind in ("ms", "mr"):
            cfg["soft_labels_k"] = k
    infos = {}

    def dataset(key):
        if key not in infos:
            infos[key] = get_dataset(key)
        return infos[key]

    facts = dataclasses.replace(schema_facts(), num_classes=lambda key: dataset(key).num_classes)
    cfg = config_lib.apply_sets(cfg, args.set)
    if getattr(args, "intermediate_student", False) and args.student is None:
        cfg["student"] = cfg["it_student"]
    cfg = config_lib.validate(cfg, facts, stage)
    runs = pathlib.Path("runs") / run_name(cfg["dataset"])
    method = methods.get(cfg["method"]) if stage == "nsd" else None
    if method and method.wants_learned_anchors(cfg["no_psc"]) and not cfg["anchors"]:
        cfg["anchors"] = str(runs / "psc" / "anchors.npz")
    if args.workdir:
        workdir = pathlib.Path(args.workdir)
    elif stage == "psc":
        workdir = runs / "psc"
    elif getattr(args, "intermediate_student", False):
        workdir = runs / "it"
    else:
        variant = cfg["method"] + ("-nopsc" if cfg["no_psc"] else "")
        workdir = runs / "nsd" / f"{variant}-{student_label(cfg['student'])}"
    return cfg, workdir, dataset(cfg["dataset"])


def _resolve_it(args: argparse.Namespace) -> tuple[dict, pathlib.Path, DatasetInfo]:
    """`--stage it`: Stage-NSD with DAIT's intermediate-teacher method, the student `it_student`
    unless --student, in runs/DATASET/it unless --out."""
    args = argparse.Namespace(
        **{**vars(args), "stage": "nsd", "method": methods.IT_METHOD, "intermediate_student": True}
    )
    return resolve(args)


def run_stage(cfg: dict, workdir: pathlib.Path, allow_change: bool = False, info=None) -> dict:
    """Runs the stage; `info` is its dataset as `resolve` found it (resolved here if None)."""
    from pand_jax.train import nsd, psc, setup

    setup.check_workdir(workdir, cfg, allow_change)
    info = info or get_dataset(cfg["dataset"])
    try:
        return (psc if cfg["stage"] == "psc" else nsd).run(cfg, workdir, info)
    finally:
        setup.release_workdir(workdir)


def run_demo(
    workdir: pathlib.Path,
    *,
    teacher_cache: int | None,
    sets: list[str],
    allow_change: bool,
    family: str = "convnext",
) -> dict:
    """Teacher (image tower `family`), then PSC, then NSD, with configs/demo.json;
    `--set SECTION:key=value` changes one section (teacher, psc or nsd). All three are checked
    before the teacher trains."""
    from pand_jax.train import demo

    d = config_lib.demo_config()
    by_section = {s: [] for s in ("teacher", "psc", "nsd")}
    for item in sets:
        section, sep, rest = item.partition(":")
        if not sep or section not in by_section:
            raise config_lib.ConfigError(
                f"with --demo, --set takes SECTION:key=value with SECTION one of "
                f"{list(by_section)}; got {item!r}"
            )
        by_section[section].append(rest)
    teacher = demo.teacher_dir(workdir, family)
    teacher_cfg = config_lib.validate(
        config_lib.apply_sets(demo.teacher_section(d, family), by_section["teacher"]),
        schema_facts(),
        "demo_teacher",
    )
    cfgs = {}
    for stage in ("psc", "nsd"):
        cfg = config_lib.default_config(stage)
        for key, value in config_lib.flatten(d[stage]):
            config_lib.override(cfg, key, value)
        cfg["teacher"] = str(teacher)
        if stage == "nsd":
            cfg["anchors"] = str(workdir / "psc" / "anchors.npz")
            if teacher_cache is not None:
                cfg["teacher_cache"] = teacher_cache
        cfgs[stage] = config_lib.validate(
            config_lib.apply_sets(cfg, by_section[stage]), schema_facts(), stage
        )
    if not (teacher / "config.json").is_file():
        acc = demo.train_teacher(teacher_cfg, teacher)
        print(f"[demo] teacher trained; zero-shot top1 of the prompt template: {100 * acc:.1f}%")
    out = {stage: run_stage(cfg, workdir / stage, allow_change) for stage, cfg in cfgs.items()}
    print(
        f"[demo] PSC top1 {100 * out['psc']['best_top1']:.1f}%, "
        f"NSD student top1 {100 * out['nsd']['best_top1']:.1f}% (chance 10%); "
        f"summaries in {workdir}/psc and {workdir}/nsd"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.demo and not args.stage:
        parser().error("give --stage psc|nsd, or --demo")

    def train():
        from pand_jax import devices

        devices.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        if args.demo:
            devices.report_devices()
            run_demo(
                pathlib.Path(args.workdir or "runs/demo"),
                teacher_cache=args.teacher_cache,
                sets=args.set,
                allow_change=args.allow_config_change,
                family=args.demo_teacher,
            )
        else:
            cfg, workdir, info = resolve(args)
            devices.report_devices(devices.compute_dtype(cfg["dtype"]))
            summary = run_stage(cfg, workdir, args.allow_config_change, info)
            print(json.dumps(summary, indent=2))

    # Before JAX is imported: a SIGTERM at any moment is one line (JAX's preemption service takes
    # it over in multi-process runs).
    with common.stop_on_sigterm("train.py"):
        return common.run(train)
