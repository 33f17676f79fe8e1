"""A workdir is used by one run at a time, is written only once every check has passed, and
keeps its best student and its metrics whole through kills (real processes and signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import NSD_ARGS, REPO


def cli(argv):
    from pand_jax.cli.train import main

    return main([str(a) for a in argv])


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        **kw,
    )


def test_a_second_run_is_refused_naming_the_first_and_kill_9_leaves_no_stale_lock(tmp_path):
    from pand_jax.train import setup

    workdir = tmp_path / "run"
    holder = _python(
        f"""
        import pathlib, sys, types
        from pand_jax.train import setup
        setup.claim_workdir(pathlib.Path({str(workdir)!r}), {{"stage": "nsd"}},
                            types.SimpleNamespace(tree=None), [])
        print("claimed", flush=True)
        sys.stdin.read()  # holds the lock until killed
    """,
        stdin=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "claimed", holder.stderr.read()
        with pytest.raises(
            setup.WorkdirError, match=rf"another run \(pid {holder.pid}\) is using {workdir}"
        ):
            setup.claim_workdir(workdir, {"stage": "nsd"}, _NoTree, [])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    setup.claim_workdir(workdir, {"stage": "nsd"}, _NoTree, [])  # the OS dropped the lock
    assert (workdir / setup.LOCK_FILE).read_text().strip() == str(os.getpid())
    setup.release_workdir(workdir)


class _NoTree:
    tree = None


def _error_line(capsys) -> str:
    """stderr's one error line (progress bars aside), and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", ["missing anchors", "batch larger than the folder"])
def test_a_refused_run_writes_nothing(teacher, tmp_path, capsys, case):
    workdir = tmp_path / "run"
    args = NSD_ARGS + ["--workdir", workdir]
    if case == "missing anchors":
        args += ["--teacher", teacher, "--anchors", tmp_path / "nope.npz"]
        message = "anchors file not found"
    else:
        from PIL import Image

        for split in ("train", "test"):
            for c in ("a", "b"):
                (tmp_path / "f" / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(tmp_path / "f" / split / c / "0.png")
        args[args.index("digits")] = f"folder:{tmp_path / 'f'}"
        args += ["--method", "none"]
        message = "fewer than one training batch of 8"
    assert cli(args) == 2
    assert message in _error_line(capsys)
    assert not workdir.exists()


@pytest.mark.parametrize("where", ["is a file", "lies under the file"])
def test_a_workdir_that_is_not_a_folder_is_one_line(tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    workdir = tmp_path / "f" if where == "is a file" else tmp_path / "f" / "run"
    assert cli(NSD_ARGS + ["--method", "none", "--workdir", workdir]) == 2
    line = _error_line(capsys)
    assert where in line and "pass a folder" in line, line


def test_bad_numbers_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli(NSD_ARGS[:-2] + ["--epochs", "2.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--epochs: invalid int value: '2.5'" in err
    assert cli(NSD_ARGS + ["--set", "optimizer.lr=NaN"]) == 2
    assert "config optimizer.lr = nan: expected a finite number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "width, teacher_id, message",
    [
        (
            8,
            "test-teacher",
            "holds 8-d anchors (teacher 'test-teacher') but the teacher "
            "'test-teacher' embeds into 64 dimensions",
        ),
        (
            64,
            "another-teacher",
            "was made with the teacher 'another-teacher', not this run's 'test-teacher'",
        ),
    ],
)
def test_anchors_of_another_teacher_are_refused_before_compiling(
    teacher, tmp_path, capsys, width, teacher_id, message
):
    from pand_jax import anchors, data

    info = data.get_dataset("digits")
    rng = np.random.default_rng(0).standard_normal((10, width))
    path = tmp_path / "anchors.npz"
    anchors.save(
        path, rng / np.linalg.norm(rng, axis=1, keepdims=True), info, teacher_id=teacher_id
    )
    assert (
        cli(NSD_ARGS + ["--teacher", teacher, "--anchors", path, "--workdir", tmp_path / "run"])
        == 2
    )
    assert message in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_kill_9_during_the_student_export_keeps_the_previous_best(tmp_path):
    """The export writes beside the old student and renames it into place; SIGKILL at the
    worst moment (the old one moved aside, the new one not yet in place) loses neither."""
    from pand_jax.deploy import student as deploy_student

    student = tmp_path / "student"
    killed = _python(f"""
        import os, pathlib, signal
        from flax import nnx
        from pand_jax.models import student as s
        path = pathlib.Path({str(student)!r})
        first = s.Student("resnet18", 3, rngs=nnx.Rngs(1))
        s.save_student(path, first, top1=0.5)
        real_replace, calls = os.replace, []
        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:  # the old copy is aside; the new one is about to move in
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(a, b)
        os.replace = replace
        s.save_student(path, s.Student("resnet18", 3, rngs=nnx.Rngs(2)), top1=0.9)
    """)
    _, err = killed.communicate()
    assert killed.returncode == -signal.SIGKILL, err
    assert not student.exists()  # the moment the kill caught
    kept = deploy_student.load(student)
    assert kept.meta["top1"] == 0.5

    from flax import nnx

    from pand_jax.models import student as s

    again = s.Student("resnet18", 3, rngs=nnx.Rngs(3))
    s.save_student(student, again, top1=0.7)  # the next export puts the kept one back first
    assert deploy_student.load(student).meta["top1"] == 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_a_resumed_run_logs_each_step_and_epoch_once(tmp_path):
    from pand_jax.train.metrics import MetricsWriter

    lines = [{"kind": "step", "step": i, "loss": 1.0} for i in range(6)]
    lines.insert(3, {"kind": "epoch", "step": 3, "epoch": 1, "top1": 0.1})
    lines.insert(7, {"kind": "epoch", "step": 6, "epoch": 2, "top1": 0.2})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "step", "st'  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    writer = MetricsWriter(tmp_path, done_steps=4, done_epochs=1)  # resumed at step 4
    writer.write("step", 4, {"loss": 2.0})
    writer.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in got] == [
        ("step", 0),
        ("step", 1),
        ("step", 2),
        ("epoch", 3),
        ("step", 3),
        ("step", 4),
    ]
    assert got[-1]["loss"] == 2.0


def test_a_stage_psc_workdir_is_named_as_such(tmp_path):
    from pand_jax.deploy import student as deploy_student

    (tmp_path / "config.json").write_text(json.dumps({"stage": "psc"}))
    with pytest.raises(ValueError, match="is a Stage-PSC workdir .*pass the Stage-NSD workdir"):
        deploy_student.load(tmp_path)
