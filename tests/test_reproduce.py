"""`reproduce.py` end to end on the offline demo (digits, a random tiny CLIP teacher), shortened
to one student, one seed, one epoch of two steps and two lambda_NSD values.

One module fixture invokes it three times, in process: first with the RKD run made to fail,
then again (it resumes: only RKD runs), then once more (everything is finished).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pathlib
import shlex

import numpy as np
import pytest
from matplotlib import image as mpimg

from pand_jax import data as data_lib
from pand_jax import methods
from pand_jax.cli import reproduce
from pand_jax.cli import train as train_cli
from pand_jax.experiments import plan
from pand_jax.experiments import results as results_lib

SHORT = [
    "--demo",
    "--seeds",
    "1",
    "--epochs",
    "1",
    "--psc-epochs",
    "1",
    "--lambdas",
    "0,0.5",
    "--teacher-cache",
    "2",
    "--set",
    "max_steps_per_epoch=2",
    "--set",
    "batch_size=16",
    "--set",
    "image_size=32",
    "--set",
    "host_image_size=36",
    "--set",
    "n_ctx=4",
]
# The distinct runs of one student and seed: Tables 1-2 plus the sweep {0, 0.5}, which
# coincides with +PSC and PAND (`test_the_sweep_points_coincide_with_table_rows`).
VARIANTS = {plan.variant(row) for row in plan.distinct_runs((0.0, 0.5))}
RUNS = len(VARIANTS) + 2  # and Stage-PSC, and DAIT's intermediate teacher


def invoke(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = reproduce.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo(teacher, tmp_path_factory):
    import shutil

    from pand_jax.train import nsd

    out = tmp_path_factory.mktemp("reproduce")
    # The session's random demo teacher (conftest.py) where --demo looks for its teacher:
    # training one is train.py --demo's test; here only shapes matter.
    shutil.copytree(teacher, out / "teacher")
    argv = SHORT + ["--out", out]
    real_run = nsd.run

    def failing_rkd(cfg, workdir, info):
        if cfg["method"] == "rkd":
            raise RuntimeError("injected failure")
        return real_run(cfg, workdir, info)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nsd, "run", failing_rkd)
        first = invoke(argv)
    first_csv = read_csv(out / "results.csv")
    second = invoke(argv)
    second_csv, second_md = read_csv(out / "results.csv"), (out / "results.md").read_text()
    third = invoke(argv)
    return dict(
        out=out,
        argv=argv,
        first=first,
        first_csv=first_csv,
        second=second,
        second_csv=second_csv,
        second_md=second_md,
        third=third,
    )


def test_the_sweep_points_coincide_with_table_rows():
    """One run per table row, and none more: the sweep's 0 is "+PSC", its 0.5 "PAND"."""
    rows = plan.table1() + plan.ablations()
    assert VARIANTS == {plan.variant(row) for row in rows}
    assert len(VARIANTS) == len(rows)
    assert {"pand-lambda0", "pand-lambda0.5", "pand-nopsc", "kd", "dait"} <= VARIANTS


def test_a_failed_run_is_reported_and_the_others_complete(demo):
    rc, stdout, stderr = demo["first"]
    assert rc == 1
    assert "failed: resnet18 seed 0 rkd: RuntimeError: injected failure" in stderr
    assert {pathlib.Path(r["workdir"]).name for r in demo["first_csv"]} == VARIANTS - {"rkd"}


def test_rerun_resumes_only_the_failed_run(demo):
    rc, stdout, _ = demo["second"]
    assert rc == 0, stdout[-2000:]
    # Stage-PSC, DAIT's intermediate teacher and the finished runs are skipped; only RKD runs.
    assert f"{RUNS - 1} of {RUNS} runs already finished" in stdout
    assert f"1 runs done, {RUNS - 1} skipped" in stdout


def test_teacher_cache_is_built_once_and_shared(demo):
    """One cache of the shared views, and one of each row that sets its own augmentation."""
    out = demo["out"]
    built = (demo["first"][1] + demo["second"][1]).count("building the teacher cache")
    own = sorted({r.values()["augment"] for r in plan.distinct_runs() if "augment" in r.values()})
    assert built == 1 + len(own)
    for name in ["seed0", *(f"seed0-{recipe}" for recipe in own)]:
        assert (out / "teacher_cache" / name / "meta.json").is_file()
    assert not list((out / "nsd").rglob("teacher_cache"))


def test_results_csv_has_every_planned_run_with_its_summary(demo):
    out, rows = demo["out"], demo["second_csv"]
    assert {pathlib.Path(r["workdir"]).name for r in rows} == VARIANTS
    assert len(rows) == len(VARIANTS)
    for r in rows:
        workdir = pathlib.Path(r["workdir"])
        summary = json.loads((workdir / "summary.json").read_text())
        assert workdir.parent == out / "nsd" / "resnet18" / "seed0"
        assert (r["dataset"], r["student"], r["method"]) == (
            "digits",
            "resnet18",
            summary["method"],
        )
        assert float(r["best_top1"]) == pytest.approx(summary["best_top1"], abs=1e-12)
        assert float(r["last_top1"]) == pytest.approx(summary["last_top1"], abs=1e-12)
        assert (int(r["seed"]), int(r["epochs"]), int(r["best_epoch"])) == (0, 1, 1)
        assert (r["no_psc"] == "True") == summary["no_psc"]
        section, leaf = plan.paper_method().sweep.key.split(".")[1:]  # loss.pand.lambda_nsd
        if section in summary["loss"]:  # the methods whose settings include PAND's section
            assert float(r["sweep_value"]) == summary["loss"][section][leaf]
        else:
            assert r["sweep_value"] == ""
        # what the run cost: every run but "none" reads the seed's cache of 2 views per image
        assert float(r["train_seconds"]) == pytest.approx(summary["train_seconds"], rel=1e-9)
        assert float(r["wall_seconds"]) == pytest.approx(summary["wall_seconds"], rel=1e-9)
        assert summary["wall_seconds"] > summary["train_seconds"]
        if r["method"] == "none":
            assert (r["teacher_mode"], r["teacher_forwards"]) == ("", "0")
        else:  # DAIT: no CLIP in its steps; its intermediate teacher read the seed's cache
            n_train = len(data_lib.load_split("digits", "train"))
            mode = "intermediate" if r["method"] == "dait" else "cached"
            assert (r["teacher_mode"], int(r["teacher_forwards"])) == (mode, 2 * n_train)


def test_results_md_gives_each_cell_from_the_runs(demo):
    md = demo["second_md"]
    by_dir = {
        pathlib.Path(r["workdir"]).name: 100 * float(r["best_top1"]) for r in demo["second_csv"]
    }
    for row in plan.table1() + plan.ablations():
        label, name = row.label, plan.variant(row)
        # digits has no paper numbers: paper and difference stay "-".
        assert f"| {label} | {by_dir[name]:.2f} | 1 | - | - |" in md
    assert f"| 0.5 | {by_dir['pand-lambda0.5']:.2f} | 1 | - | - |" in md


def test_results_md_puts_the_paper_beside_ours():
    """CUB / ResNet-18 has paper numbers: mean, sample std, n and the difference."""

    def result(method, lam, no_psc, seed, top1):
        loss = {"pand": {"lambda_nsd": lam, "nsd_form": "paper"}} if lam is not None else {}
        return results_lib.Result(
            "cub",
            "resnet18",
            method,
            no_psc,
            lam,
            seed,
            300,
            top1,
            top1,
            300,
            1.0,
            train_seconds=8.0,
            wall_seconds=10.0,
            teacher_mode="cached",
            teacher_forwards=100,
            workdir=pathlib.Path("x"),
            config={"no_psc": no_psc, "loss": loss},
        )

    rs = [
        result("pand", 0.5, False, 0, 0.75),
        result("pand", 0.5, False, 1, 0.77),
        result("vl2lite", None, False, 0, 0.70),
    ]
    md = results_lib.markdown(rs)
    assert "| PAND | 76.00 ± 1.41 | 2 | 76.09 | -0.09 |" in md  # std over seeds, ddof 1
    assert "| VL2Lite | 70.00 | 1 | 72.67 | -2.67 |" in md
    assert "| +NSD | - | 0 | 75.91 | - |" in md  # known paper cell, no run
    assert "| KD | - | 0 | - | - |" in md
    assert "| 0.5 | 76.00 ± 1.41 | 2 | 76.41 | -0.41 |" in md  # the lambda sweep's own number
    # what each method cost: mean over its runs; a method without runs has no figures
    assert "| PAND | cached | 100 | 1.0 | 10.0 |" in md
    assert "| KD | - | - | - | - |" in md


def test_second_invocation_skips_everything_and_gives_the_same_results(demo):
    rc, stdout, _ = demo["third"]
    assert rc == 0
    assert f"{RUNS} of {RUNS} runs already finished" in stdout and "0 runs done" in stdout
    assert read_csv(demo["out"] / "results.csv") == demo["second_csv"]
    assert (demo["out"] / "results.md").read_text() == demo["second_md"]


def test_figures_are_written(demo):
    figures = demo["out"] / "figures"
    for name in ("accuracy_per_epoch", "lambda_sensitivity", "tsne_vl2lite_vs_pand"):
        img = mpimg.imread(figures / f"digits_{name}.png")
        assert img.shape[0] > 400 and img.shape[1] > 600
        assert img[..., :3].std() > 0.05  # not a blank canvas
    # Figure 3's points are the whole test split, in order, with their labels.
    test = data_lib.load_split("digits", "test")
    with np.load(figures / "cache" / "tsne_pand_resnet18_seed0.npz") as f:
        assert f["xy"].shape == (len(test), 2)
        assert f["labels"].tolist() == [test[i]["label"] for i in range(len(test))]


def test_every_method_stays_visible_in_the_accuracy_plot(demo, tmp_path):
    from pand_jax.experiments import figures

    # One epoch near chance: several methods share a top-1, and so a point.
    results = results_lib.collect(demo["out"])
    lines = figures.accuracy_curves(results, "digits", tmp_path / "a.png").axes[0].get_lines()
    assert len(lines) == len(figures.ROW_ORDER)
    assert len({float(line.get_xdata()[0]) for line in lines}) == len(lines)  # side by side
    assert len({line.get_marker() for line in lines}) == len(lines)


def test_list_prints_train_commands_in_dependency_order(demo, capsys):
    """`--list` (with the real lambda sweep) parses back with train.py's parser; PSC first,
    then the run that builds the teacher cache; rows that coincide appear once."""
    argv = [a for a in demo["argv"]]
    i = argv.index("--lambdas")
    del argv[i : i + 2]
    rc, stdout, stderr = invoke(argv + ["--list"])
    assert rc == 0
    lines = stdout.strip().splitlines()
    parsed = []
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["python", "train.py"]
        parsed.append(train_cli.resolve(train_cli.parser().parse_args(words[2:]))[:2])
    stages = [cfg["stage"] for cfg, _ in parsed]
    assert stages == ["psc"] + ["nsd"] * (len(lines) - 1)
    assert parsed[0][1] == demo["out"] / "psc"
    assert parsed[1][0]["teacher_cache"] == 2 and parsed[1][0]["method"] != "none"
    # then DAIT's intermediate teacher (--stage it), which DAIT's run reads
    assert parsed[2][0]["method"] == "dait_it" and parsed[2][1] == demo["out"] / "it" / "seed0"
    dait = next(cfg for cfg, _ in parsed[1:] if cfg["method"] == "dait")
    assert dait["intermediate_teacher"] == str(demo["out"] / "it" / "seed0")
    names = [workdir.name for cfg, workdir in parsed[1:] if cfg["method"] != "dait_it"]
    assert sorted(names) == sorted(
        VARIANTS | {"pand-lambda0.25", "pand-lambda0.75", "pand-lambda1"}
    )
    assert "The first 3 (Stage-PSC, one run per seed that builds" in stderr
    # Every run reads the one cache of its seed, but a row that sets its own augmentation
    # (function matching's mixup) reads one of its own.
    caches = {
        cfg["method"]: cfg.get("teacher_cache_dir")
        for cfg, _ in parsed[1:]
        if methods.get(cfg["method"]).reads_clip
    }
    own = {
        m.name: dict(m.table_sets)["augment"]
        for m in methods.REGISTRY.values()
        if "augment" in dict(m.table_sets)
    }
    assert own and caches == {
        method: str(
            demo["out"] / "teacher_cache" / ("seed0" + (f"-{own[method]}" if method in own else ""))
        )
        for method in caches
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "cub", "--students", "resnet50"], "unknown student 'resnet50'"),
        (["--dataset", "cub", "--set", "loss.lambda_nsd=1"], "--lambdas"),
        (["--dataset", "cub", "--set", "nope=1"], "unknown config key 'nope'"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--seeds", "1"], "give --dataset NAME"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    rc, stdout, stderr = invoke(args + ["--list"])
    assert rc == 2
    assert message in stderr and stderr.count("\n") == 1 and stdout == ""
