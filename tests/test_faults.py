"""Fault injection: bad config values, corrupt checkpoints, a full disk during a save, SIGTERM
during a save, a non-finite loss, and stale or damaged caches. Everything runs in process
through `pand_jax.cli.train.main` on digits with the tiny random teacher of conftest.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil
import signal

import numpy as np
import pytest
from conftest import NSD_ARGS, PSC_ARGS
from test_train import latest_state


def cli(argv):
    from pand_jax.cli.train import main

    return main([str(a) for a in argv])


def with_value(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = str(value)
    return args


# Two epochs of one step: checkpoints 1 and 2.
PSC2 = with_value(PSC_ARGS, "--epochs", 2)


def assert_same_state(a, b):
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def psc2(teacher, tmp_path_factory):
    """An undisturbed two-epoch PSC run, the reference every faulted run must end at."""
    workdir = tmp_path_factory.mktemp("psc2")
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 0
    assert steps(workdir) == [1, 2]
    return workdir


def messages(err):
    """stderr without the progress bars."""
    return [line for line in err.strip().splitlines() if "%|" not in line and line.strip()]


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def fresh_run(src, dst):
    """A new workdir that only reuses `src`'s teacher feature caches (to save time)."""
    dst.mkdir()
    for f in src.glob("features_*.npz"):
        shutil.copy(f, dst)
    return dst


# ------------------------------------------------------------------------ bad values

BAD_VALUES = [  # (stage args, extra args, key, value as printed)
    (NSD_ARGS, ["--batch-size", "0"], "batch_size", "0"),
    (NSD_ARGS, ["--batch-size", "-5"], "batch_size", "-5"),
    (NSD_ARGS, ["--batch-size", "1"], "batch_size", "1"),  # BatchNorm needs 2
    (NSD_ARGS, ["--set", "optimizer.lr=abc"], "optimizer.lr", "'abc'"),
    (NSD_ARGS, ["--set", "optimizer.lr=-1"], "optimizer.lr", "-1"),
    (NSD_ARGS, ["--set", "optimizer.end_lr=0.5"], "optimizer.end_lr", "0.5"),
    (NSD_ARGS, ["--set", "optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "-0.1"),
    (NSD_ARGS, ["--set", "optimizer.grad_clip=0"], "optimizer.grad_clip", "0"),
    (NSD_ARGS, ["--epochs", "0"], "epochs", "0"),
    (NSD_ARGS, ["--set", "epochs=2.5"], "epochs", "2.5"),
    (NSD_ARGS, ["--lambda-nsd", "-1"], "loss.pand.lambda_nsd", "-1.0"),
    (NSD_ARGS, ["--set", "loss.pand.nsd_k=10"], "loss.pand.nsd_k", "10"),  # digits: 10 classes
    # the spelling of earlier versions still sets the key
    (NSD_ARGS, ["--nsd-form", "batch", "--set", "loss.nsd_k=8"], "loss.pand.nsd_k", "8"),
    (
        NSD_ARGS,
        ["--nsd-form", "batch", "--set", "loss.pand.nsd_group_size=3"],
        "loss.pand.nsd_group_size",
        "3",
    ),
    (NSD_ARGS, ["--set", "image_size=64"], "image_size", "64"),  # host_image_size is 36
    (NSD_ARGS, ["--set", "eval_batch_size=0"], "eval_batch_size", "0"),
    (NSD_ARGS, ["--set", "method=pandas"], "method", "'pandas'"),
    (NSD_ARGS, ["--set", "augment=flip"], "augment", "'flip'"),
    (NSD_ARGS, ["--set", "no_psc=1"], "no_psc", "1"),
    (NSD_ARGS, ["--set", "teacher_cache=-1"], "teacher_cache", "-1"),
    (NSD_ARGS, ["--set", "loss.vl2lite.tau=0"], "loss.vl2lite.tau", "0"),
    (NSD_ARGS, ["--set", "no_psc=true"], "anchors", "'a.npz'"),  # --anchors a.npz below
    (PSC_ARGS, ["--set", "optimizer.momentum=1.5"], "optimizer.momentum", "1.5"),
    (PSC_ARGS, ["--set", "optimizer.schedule=linear"], "optimizer.schedule", "'linear'"),
    (PSC_ARGS, ["--set", "feature_batch_size=0"], "feature_batch_size", "0"),
    (PSC_ARGS, ["--set", "n_ctx=0"], "n_ctx", "0"),
    (PSC_ARGS, ["--set", "dataset=7"], "dataset", "7"),
    (PSC_ARGS, ["--set", "dataset=mnist"], "dataset", "'mnist'"),
    (PSC_ARGS, ["--set", "prompt_template=a photo"], "prompt_template", "'a photo'"),
    (PSC_ARGS, ["--set", "seed=-1"], "seed", "-1"),
    (PSC_ARGS, ["--set", "data_dir=5"], "data_dir", "5"),
    (PSC_ARGS, ["--set", "stage=nsd"], "stage", "'nsd'"),
]


@pytest.mark.parametrize(
    "stage, extra, key, value", BAD_VALUES, ids=[f"{a[1]}-{k}={v}" for a, _, k, v in BAD_VALUES]
)
def test_bad_value_is_one_line_naming_key_and_value(stage, extra, key, value, tmp_path, capsys):
    argv = stage + extra + ["--teacher", tmp_path / "no-teacher", "--workdir", tmp_path / "w"]
    if stage is NSD_ARGS:
        argv += ["--anchors", "a.npz"]
    code = cli(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: config {key} = {value}: "), err
    assert not (tmp_path / "w").exists()  # checked before any work


def test_demo_sections_are_checked_before_the_teacher_trains(tmp_path, capsys):
    for item, key in [
        ("nsd:batch_size=0", "batch_size"),
        ("teacher:steps=0", "steps"),
        ("psc:optimizer.lr=abc", "optimizer.lr"),
    ]:
        code = cli(["--demo", "--workdir", tmp_path, "--set", item])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: config {key} = "), err
        assert not (tmp_path / "teacher").exists()


def test_batch_must_split_evenly_over_every_device():
    from pand_jax import config
    from pand_jax.cli.train import schema_facts

    real = schema_facts()
    eight = dataclasses.replace(real, devices=8, processes=1)
    cfg = config.default_config("nsd")
    for key, value in [("batch_size", 12), ("eval_batch_size", 20)]:
        bad = config.apply_sets(cfg, [f"{key}={value}"])
        with pytest.raises(
            config.ConfigError,
            match=f"config {key} = {value}: expected a multiple of the 8 devices",
        ):
            config.validate(bad, eight, "nsd")
    assert config.validate(cfg, eight, "nsd")["batch_size"] == 128


def test_valid_config_is_normalised_and_a_workdir_config_is_unchanged(psc2):
    """Numbers given as integers become floats where floats belong; a run's config.json
    validates to itself, so resuming a workdir compares equal."""
    from pand_jax import config
    from pand_jax.cli.train import schema_facts

    cfg = config.apply_sets(config.default_config("nsd"), ["optimizer.lr=1", "epochs=3"])
    out = config.validate(cfg, schema_facts(), "nsd")
    assert type(out["optimizer"]["lr"]) is float and type(out["epochs"]) is int
    old = json.loads((psc2 / "config.json").read_text())
    assert config.diff(old, config.validate(old, schema_facts(), "psc")) == []


# ------------------------------------------------------------------------ checkpoints


def corrupt(checkpoint):
    """Overwrites the array data of a checkpoint (what a torn write or bit rot leaves)."""
    files = [f for f in checkpoint.rglob("*") if f.is_file() and "d" in f.parent.name]
    assert files
    for f in files:
        f.write_bytes(b"garbage" * 3)


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes(
    teacher, psc2, tmp_path, capfd
):
    workdir = copy_run(psc2, tmp_path / "run")
    corrupt(workdir / "checkpoints" / "2")
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 0
    out, err = capfd.readouterr()
    warnings = [line for line in (out + err).splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "checkpoint 2" in warnings[0], out + err
    assert "Traceback" not in err and "tensorstore" not in err.lower(), err
    assert (workdir / "checkpoints_corrupt" / "2").is_dir()  # moved, not deleted
    assert steps(workdir) == [1, 2]
    assert_same_state(latest_state(workdir), latest_state(psc2))


def test_no_readable_checkpoint_stops_in_two_lines(teacher, psc2, tmp_path, capfd):
    workdir = copy_run(psc2, tmp_path / "run")
    for step in (1, 2):
        corrupt(workdir / "checkpoints" / str(step))
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 2
    err = capfd.readouterr().err
    assert len(messages(err)) <= 2, err
    assert "no checkpoint" in err and "--workdir" in err
    assert steps(workdir) == [1, 2] and not (workdir / "checkpoints_corrupt").exists()


def test_checkpoint_holds_the_position_at_save_time(tmp_path, monkeypatch):
    """The position JSON is written in the background; the loop changing its dict meanwhile
    (the next epoch's first step) must not reach the checkpoint. The writer waits until the
    dict has changed, which makes the overlap certain."""
    import asyncio
    import threading

    import jax.numpy as jnp
    from orbax.checkpoint import JsonCheckpointHandler

    from pand_jax.train.checkpoint import Checkpointer

    original, changed = JsonCheckpointHandler._save_fn, threading.Event()

    async def save_after_the_change(self, x, directory):
        # a bound on the wait only so that a save made in this thread cannot hang the test
        await asyncio.to_thread(changed.wait, 60)
        return await original(self, x, directory)

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", save_after_the_change)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    state, pos = {"w": jnp.zeros(3)}, {"epoch": 1, "step": 0, "history": [{"epoch": 1}]}
    ckpt.save(1, state, pos)
    pos["step"] = 1
    pos["history"].append({"epoch": 2})
    changed.set()
    ckpt.wait()
    assert ckpt.restore(state, 1)[1] == {"epoch": 1, "step": 0, "history": [{"epoch": 1}]}
    ckpt.close()


def full_disk_on_save(monkeypatch, n):
    """Makes the n-th checkpoint save fail in the background the way TensorStore reports a
    full disk (the error surfaces when orbax waits for the write)."""
    from orbax.checkpoint import StandardCheckpointHandler

    original, calls = StandardCheckpointHandler.async_save, []

    class Failed:
        def result(self, timeout=None):
            raise ValueError(
                'RESOURCE_EXHAUSTED: Error writing local file "/x/d/abc": '
                "[OS error 28: No space left on device] " + "spec " * 100
            )

    async def async_save(self, *args, **kwargs):
        futures = await original(self, *args, **kwargs)
        calls.append(1)
        return [*(futures or []), Failed()] if len(calls) == n else futures

    monkeypatch.setattr(StandardCheckpointHandler, "async_save", async_save)


def test_full_disk_during_a_save_is_one_line_and_a_rerun_resumes(
    teacher, psc2, tmp_path, capfd, monkeypatch
):
    workdir = fresh_run(psc2, tmp_path / "run")
    full_disk_on_save(monkeypatch, 2)
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 2
    err = capfd.readouterr().err
    lines = messages(err)
    assert len(lines) == 1 and len(lines[0]) < 400, err
    assert "no space left" in err and str(workdir / "checkpoints") in err
    assert "a checkpoint needs about 2.0 KiB" in err  # ctx and momentum: 2 x 4 x 64 float32
    assert "run the same command again" in err
    assert not list((workdir / "checkpoints").glob("*tmp*"))  # the partial save is removed
    assert steps(workdir) == [1]
    monkeypatch.undo()
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 0
    assert_same_state(latest_state(workdir), latest_state(psc2))


def test_sigterm_during_a_save_resumes_to_the_same_state(teacher, psc2, tmp_path, monkeypatch):
    """SIGTERM arrives while the first epoch's checkpoint is being written: the run saves
    where it stopped, exits, and the rerun ends where an undisturbed run ends."""
    from pand_jax.train import checkpoint

    workdir = fresh_run(psc2, tmp_path / "run")
    original = checkpoint.Checkpointer.save

    def save_then_sigterm(self, step, state, meta):
        original(self, step, state, meta)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_sigterm)
    with pytest.raises(SystemExit, match="Run the same command again"):
        cli(PSC2 + ["--teacher", teacher, "--workdir", workdir])
    monkeypatch.undo()
    assert not (workdir / "summary.json").exists()
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 0
    assert_same_state(latest_state(workdir), latest_state(psc2))
    summary, reference = (json.loads((w / "summary.json").read_text()) for w in (workdir, psc2))
    assert (summary["best_top1"], summary["last_top1"]) == (
        reference["best_top1"],
        reference["last_top1"],
    )


def test_sigterm_during_an_evaluation_stops_it_and_the_rerun_evaluates(
    teacher, psc2, tmp_path, monkeypatch
):
    """SIGTERM arrives as epoch 1's evaluation starts: the run abandons the evaluation (it can
    outlast a preemption's grace period on a CPU), saves the epoch's trained state, and the
    rerun evaluates that epoch (keeping the epoch's checkpoint, whose arrays it restored) and
    ends where an undisturbed run ends."""
    import dataclasses

    from pand_jax.train import loop

    workdir = fresh_run(psc2, tmp_path / "run")
    original_fit, finished = loop.fit, []

    def fit_with_sigterm_in_the_first_evaluation(task, *args, **kwargs):
        def evaluate(state):
            if not finished:
                os.kill(os.getpid(), signal.SIGTERM)
            finished.append(task.evaluate(state))
            return finished[-1]

        return original_fit(dataclasses.replace(task, evaluate=evaluate), *args, **kwargs)

    monkeypatch.setattr(loop, "fit", fit_with_sigterm_in_the_first_evaluation)
    with pytest.raises(SystemExit, match=r"epoch 1, step 1 \(before its evaluation\)"):
        cli(PSC2 + ["--teacher", teacher, "--workdir", workdir])
    assert finished == [] and steps(workdir) == [1]
    assert not (workdir / "anchors.npz").exists()  # nothing exported from an evaluation
    monkeypatch.undo()
    assert cli(PSC2 + ["--teacher", teacher, "--workdir", workdir]) == 0
    assert steps(workdir) == [1, 2]
    assert_same_state(latest_state(workdir), latest_state(psc2))
    summary, reference = (json.loads((w / "summary.json").read_text()) for w in (workdir, psc2))
    assert (summary["best_top1"], summary["last_top1"]) == (
        reference["best_top1"],
        reference["last_top1"],
    )
    lines = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    epochs = [line["epoch"] for line in lines if line["kind"] == "epoch"]
    assert epochs == [1, 2]


# ------------------------------------------------------------------------ non-finite loss


def test_non_finite_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """The objective turns NaN from epoch 2 on (global step 2 of 2 steps per epoch): the run
    stops naming step 2 and the non-finite terms; the only checkpoint is epoch 1's (step 2),
    none is written from the bad state."""
    import jax.numpy as jnp

    from pand_jax import losses

    def nan_from_epoch_2(x):
        cls = losses.cross_entropy(x.logits, x.labels) * jnp.where(x.epoch >= 1, jnp.nan, 1.0)
        return cls, {"cls": cls}

    from pand_jax import methods

    monkeypatch.setitem(
        methods.REGISTRY,
        "none",
        dataclasses.replace(methods.REGISTRY["none"], objective=nan_from_epoch_2),
    )
    args = with_value(NSD_ARGS, "--epochs", 3) + ["--set", "method=none", "--workdir", tmp_path]
    args[args.index("max_steps_per_epoch=1")] = "max_steps_per_epoch=2"
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "non-finite values at step 2 " in err, err
    for term in ("loss=nan", "cls=nan", "grad_norm=nan"):
        assert term in err
    assert steps(tmp_path) == [2]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if r["kind"] == "step"] == [0, 1, 2]


# ------------------------------------------------------------------------ caches


def digits_loader(cache_dir, size=12):
    from pand_jax.data import load_split, pipeline

    source = load_split("digits", "test")
    return pipeline.Loader(
        source, global_batch_size=64, image_size=size, train=False, cache_dir=cache_dir
    )


def first_batch(loader):
    return next(loader.epoch(0))["image"]


def test_damaged_or_foreign_host_image_cache_is_rebuilt(tmp_path, capsys):
    expected = first_batch(digits_loader(None))
    digits_loader(tmp_path)
    images = next(tmp_path.glob("*.images.npy"))
    size = images.stat().st_size
    capsys.readouterr()

    with open(images, "r+b") as f:  # truncated: a disk filled up or a copy cut short
        f.truncate(size // 2)
    np.testing.assert_array_equal(first_batch(digits_loader(tmp_path)), expected)
    assert "warning: rebuilding the image cache" in capsys.readouterr().out
    assert images.stat().st_size == size

    key = next(tmp_path.glob("*.json"))  # written for other settings
    key.write_text(json.dumps({**json.loads(key.read_text()), "version": -1}))
    np.save(images, np.zeros(np.load(images, mmap_mode="r").shape, np.uint8))
    np.testing.assert_array_equal(first_batch(digits_loader(tmp_path)), expected)
    assert "other settings" in capsys.readouterr().out


def test_rebuilding_an_image_cache_never_shows_a_reader_half_written_labels(tmp_path, monkeypatch):
    """Two runs (hosts on a shared disk) may build the same cache at once: while the second
    writes its labels, a reader that found the first one complete still reads whole labels."""
    loader = digits_loader(tmp_path)
    labels_path = next(tmp_path.glob("*.labels.npy"))
    stem = str(labels_path)[: -len(".labels.npy")]
    key = json.loads(pathlib.Path(stem + ".json").read_text())
    expected = np.load(labels_path)
    read_meanwhile = []
    real_save = np.save

    def save_in_two_halves(path, array):  # a reader looks in between
        buffer = io.BytesIO()
        real_save(buffer, array)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            try:
                read_meanwhile.append(np.load(labels_path))
            except ValueError as e:  # what a half-written .npy gives
                read_meanwhile.append(e)
            f.write(data[len(data) // 2 :])

    monkeypatch.setattr(np, "save", save_in_two_halves)
    loader._write_cache(stem, key)
    (seen,) = read_meanwhile
    assert isinstance(seen, np.ndarray), seen
    np.testing.assert_array_equal(seen, expected)
    np.testing.assert_array_equal(np.load(labels_path), expected)
    assert sorted(p.name[len(pathlib.Path(stem).name) :] for p in tmp_path.iterdir()) == [
        ".images.npy",
        ".json",
        ".labels.npy",
    ]  # no temporary file left


def test_psc_feature_cache_is_keyed_by_the_compute_dtype(teacher, tmp_path, capsys):
    """Features computed in bfloat16 are not reused for a float32 run (nor the reverse)."""
    from pand_jax import config
    from pand_jax.data import get_dataset
    from pand_jax.train import psc, setup
    from pand_jax.train.stage import Stage

    cfg = config.apply_sets(
        config.default_config("psc"),
        ["dataset=digits", "feature_image_size=32", "feature_batch_size=64"],
    )
    clip, teacher_id = setup.load_teacher(str(teacher), np.float32)
    printed = []
    for dtype in ("float32", "bfloat16"):
        cfg["dtype"] = dtype
        stage = Stage.open("psc", cfg, tmp_path, get_dataset("digits"))
        psc.teacher_image_features(stage, clip, teacher_id, "test")
        printed.append(capsys.readouterr().out)
    assert "recomputing" not in printed[0] and "warning: recomputing" in printed[1]


def test_truncated_teacher_cache_is_rebuilt(teacher, tmp_path, capsys):
    from pand_jax import devices
    from pand_jax.data.sources import ArraySource
    from pand_jax.train import setup, teacher_cache

    rng = np.random.default_rng(0)
    source = ArraySource(
        rng.integers(0, 255, (8, 36, 36, 3), np.uint8), np.arange(8) % 10, name="tiny"
    )
    clip, _ = setup.load_teacher(str(teacher), np.float32)

    spec = teacher_cache.Spec(
        teacher="t",
        dataset="tiny",
        split="train",
        data_dir="None",
        views=2,
        seed=0,
        recipe="rrc",
        host_image_size=36,
        image_size=32,
        compute_dtype="float32",
        dtype="float32",
    )

    def build():
        """Every (example, view) as the trainer reads it."""
        cache = teacher_cache.build(
            clip,
            source,
            spec,
            batch_size=8,
            mesh=devices.make_mesh(),
            teacher_sharding="replicated",
            path=tmp_path,
        )
        return cache.lookup(np.arange(8).repeat(2), np.tile(np.arange(2), 8))["teacher"]

    first = build()
    with open(tmp_path / teacher_cache.EMBEDDINGS, "r+b") as f:
        f.truncate(200)
    capsys.readouterr()
    np.testing.assert_array_equal(build(), first)
    assert "warning: embeddings.npy unreadable (ValueError), rebuilding" in capsys.readouterr().out


def test_workdir_json_is_never_seen_half_written(tmp_path, monkeypatch):
    """Process 0 writes the workdir's config.json while the run's other processes check it (a
    two-process run once read it empty and stopped). A reader that looks while the new config
    is half written (the write stops in the middle for it) finds the old one whole; after the
    write it finds the new one."""
    from pand_jax import config as config_module

    old, new = ({f"key{i}": f"value {n}" * 50 for i in range(400)} for n in (0, 1))
    config_module.write_config(tmp_path, old)
    path, seen = tmp_path / "config.json", []
    real_write_text = pathlib.Path.write_text

    def write_text_in_two_halves(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        seen.append(json.loads(path.read_text()))  # a reader looks in between
        with open(self, "a") as f:
            f.write(data[len(data) // 2 :])
        return len(data)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text_in_two_halves)
    config_module.write_config(tmp_path, new)
    monkeypatch.undo()
    assert seen == [old]
    assert json.loads(path.read_text()) == new
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left
