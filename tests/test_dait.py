"""DAIT end to end: `--stage it` trains the intermediate teacher (an exported student of its
own), `--method dait` distils it, and a missing or mismatched IT is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import NSD_ARGS


def cli(argv):
    from pand_jax.cli.train import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def it_run(teacher, psc_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("it")
    args = [a for a in NSD_ARGS if a not in ("--stage", "nsd")]
    assert (
        cli(
            [
                "--stage",
                "it",
                *args,
                "--teacher",
                teacher,
                "--anchors",
                psc_run / "anchors.npz",
                "--out",
                workdir,
            ]
        )
        == 0
    )
    return workdir


def test_the_intermediate_teacher_is_a_student_of_its_own(it_run):
    from pand_jax.deploy import student as student_lib

    cfg = json.loads((it_run / "config.json").read_text())
    assert (cfg["stage"], cfg["method"], cfg["student"]) == ("nsd", "dait_it", "mobilenet_v2")
    summary = json.loads((it_run / "summary.json").read_text())
    assert summary["teacher_mode"] == "online" and summary["learned_anchors"]
    steps = [json.loads(line) for line in (it_run / "metrics.jsonl").open()]
    step = next(r for r in steps if r["kind"] == "step")
    assert {"cls", "representation", "semantic"} <= set(step)
    assert student_lib.load(it_run).model.arch == "mobilenet_v2"  # evaluate/export read it


def test_dait_distils_the_frozen_intermediate_teacher(it_run, tmp_path):
    from test_train import _flat, latest_state

    args = NSD_ARGS + [
        "--method",
        "dait",
        "--intermediate-teacher",
        it_run,
        "--set",
        "loss.dait.delta=1.0",
        "--out",
        tmp_path / "dait",
    ]
    assert cli(args) == 0
    summary = json.loads((tmp_path / "dait/summary.json").read_text())
    # its teacher passes are those the intermediate teacher's training took
    it_forwards = json.loads((it_run / "summary.json").read_text())["teacher_forwards"]
    assert it_forwards > 0
    assert (summary["teacher_mode"], summary["teacher_forwards"]) == ("intermediate", it_forwards)
    step = next(
        json.loads(line)
        for line in (tmp_path / "dait/metrics.jsonl").open()
        if json.loads(line)["kind"] == "step"
    )
    assert {"cls", "feature", "kd"} <= set(step) and np.isfinite(step["feature"])
    # the adapter trained beside the student: ResNet-18's 512 channels to MobileNet-V2's 1280
    params = _flat(latest_state(tmp_path / "dait")["params"])
    assert params["adapter/kernel"].shape == (512, 1280)


def test_bad_intermediate_teachers_are_one_line(it_run, tmp_path, capsys):
    base = NSD_ARGS + ["--method", "dait", "--out", tmp_path / "run"]
    assert cli(base) == 2
    assert (
        "config intermediate_teacher = None: expected the intermediate teacher's folder "
        "(made by python train.py --stage it --dataset digits)"
    ) in capsys.readouterr().err
    assert cli(base + ["--intermediate-teacher", tmp_path / "nope"]) == 2
    err = capsys.readouterr().err
    assert (
        f"no intermediate teacher at {tmp_path / 'nope'}. Train it with: python train.py "
        "--stage it --dataset digits"
    ) in err
    birds = tmp_path / "birds"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (birds / split / c).mkdir(parents=True)
            from PIL import Image

            for k in range(4):
                Image.new("RGB", (8, 8), (k, 9, 9)).save(birds / split / c / f"{k}.png")
    args = [f"folder:{birds}" if a == "digits" else a for a in base]
    assert cli(args + ["--intermediate-teacher", it_run]) == 2
    err = capsys.readouterr().err
    assert (
        f"the intermediate teacher at {it_run} predicts the 10 classes of 'digits', not the 2"
        in err
        and "Traceback" not in err
    )
    assert not (tmp_path / "run").exists()
