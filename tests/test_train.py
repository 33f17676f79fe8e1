"""The trainer end to end through `train.py`, on `digits` with a tiny random CLIP teacher.

Runs that need another device count or several processes go through subprocesses (the device
count is fixed when JAX starts). Parameters are compared through the checkpoints they write.
"""

from __future__ import annotations

import json
import pathlib
import signal
import socket

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import NSD_ARGS, PSC_ARGS, run_train


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def latest_state(workdir: pathlib.Path, step: int | None = None) -> dict:
    """The arrays of the checkpoint at `step` (default the newest) as NumPy, whatever device
    count wrote them."""
    import jax

    steps = checkpoint_steps(workdir)
    assert step is None or step in steps, f"no checkpoint of step {step} in {workdir}: {steps}"
    path = workdir / "checkpoints" / str(steps[-1] if step is None else step) / "state"
    path = path.absolute()
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _flat(tree) -> dict[str, np.ndarray]:
    """{"a/b/c": array}: checkpoints restore list indices as strings and keep NNX's "value"
    level, a pure dict of an NNX state has neither."""
    import jax

    def name(path):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        return "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)

    return {
        name(path): np.asarray(v, np.float64)
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_updates_close(got, want, before, rtol):
    """Each array of `got` equals `want` to `rtol` of the size of the change `want - before`
    (training moved it by that much), with a floor of 1e-3 of the whole tree's change for
    arrays that training does not move. Comparing to the weights themselves would let a wrong
    gradient pass: the update is a tiny fraction of a weight."""
    got, want, before = _flat(got), _flat(want), _flat(before)
    assert got.keys() == want.keys() == before.keys()
    changes = {k: want[k] - before[k] for k in want}
    floor = 1e-3 * np.sqrt(sum(np.sum(c * c) for c in changes.values()))
    assert floor > 0, "training changed nothing"
    for k, change in changes.items():
        err = np.linalg.norm(got[k] - want[k])
        assert err <= rtol * max(np.linalg.norm(change), floor), (k, err, np.linalg.norm(change))


def initial_nsd_state(workdir: pathlib.Path) -> dict:
    """The state train.py starts Stage-NSD from (params and BatchNorm statistics), rebuilt
    from the run's config: the seed fixes it."""
    import jax.numpy as jnp
    from flax import nnx
    from helpers import classes_info

    from pand_jax import methods
    from pand_jax.train import nsd

    cfg = json.loads((workdir / "config.json").read_text())
    model = nsd.build_model(
        methods.get(cfg["method"]), cfg, classes_info(10), teacher_dim=64, dtype=jnp.float32
    )
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}


def assert_trees_close(a, b, rtol, atol):
    import jax

    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


# Device-count and process-count runs: 2 epochs of 2 steps, with a learning rate that moves
# the weights by ~1e-3 of their size so their updates are resolved in fp32, and every
# convolution on oneDNN (PAND_ONEDNN=all; these tiny ones would otherwise take the jnp forms).
# The views are the deterministic "eval" ones (the rrc crop's resize rounds by how the batch is
# split).
ONEDNN = {"PAND_ONEDNN": "all"}
NSD_STEPS_ARGS = [
    *NSD_ARGS,
    "--set",
    "optimizer.lr=1e-3",
    "--set",
    "optimizer.end_lr=1e-4",
    "--set",
    "augment=eval",
]
NSD_STEPS_ARGS[NSD_STEPS_ARGS.index("--epochs") + 1] = "2"
NSD_STEPS_ARGS[NSD_STEPS_ARGS.index("max_steps_per_epoch=1")] = "max_steps_per_epoch=2"


@pytest.fixture(scope="session")
def nsd_steps_run(teacher, psc_run, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("nsd_steps")
    run_train(
        NSD_STEPS_ARGS
        + ["--teacher", teacher, "--anchors", psc_run / "anchors.npz", "--workdir", workdir],
        env=ONEDNN,
    )
    return workdir


def assert_epoch_matches(got: pathlib.Path, want: pathlib.Path, epoch: int):
    """Parameters and BatchNorm statistics after epoch `epoch` (1 or 2, of 2 steps each) to
    3e-2 of how far that epoch moved them, for runs that started the epoch from the same state
    (epoch 2: `start_epoch_2_from`).
    Reductions over the batch (weight gradients, BatchNorm statistics) round by how it is split
    (1 ulp), and the random-init training-mode BatchNorms and the kinks of L1 (L_vis) and ReLU
    amplify that step by step: measured across device and process counts and conv paths
    (oneDNN, XLA's YNNPACK and Eigen kernels; JAX 0.10 and 0.12), up to 0.35 % of an update after
    2 steps from equal states but up to 8.5 % after 4, which is why the second epoch starts from
    the one-device run's state instead of running on from the first. A 10 % error in the updates
    fails (a learning rate 1.1x the 1-device run's is 40 % off after 2 steps); epoch 2 checks
    what only it does (its data, the schedule, BatchNorm statistics carried across the epoch's
    evaluation, Adam's moments)."""
    before = initial_nsd_state(want) if epoch == 1 else latest_state(want, 2)
    a, b = latest_state(got, 2 * epoch), latest_state(want, 2 * epoch)
    assert_updates_close(a["params"], b["params"], before["params"], 3e-2)
    assert_updates_close(a["rest"], b["rest"], before["rest"], 3e-2)


def start_epoch_2_from(reference: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """`workdir` holding `reference`'s config and its checkpoint after epoch 1 (step 2), which
    the same command resumes from, with any device or process count."""
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(reference / "config.json", workdir)
    shutil.copytree(reference / "checkpoints" / "2", workdir / "checkpoints" / "2")
    return workdir


def test_psc_writes_anchors_summary_and_metrics(psc_run):
    summary = json.loads((psc_run / "summary.json").read_text())
    assert summary["stage"] == "psc" and summary["dataset"] == "digits"
    assert summary["compute_dtype"] == "float32"
    with np.load(psc_run / "anchors.npz") as f:
        anchors = f["anchors"]
        assert anchors.shape == (10, 64)
        np.testing.assert_allclose(np.linalg.norm(anchors, axis=-1), 1.0, rtol=1e-5)
        assert json.loads(str(f["meta"]))["n_ctx"] == 4
    with np.load(psc_run / "features_test.npz") as f:  # the cached teacher test features
        top1 = np.mean(np.argmax(f["features"] @ anchors.T, -1) == f["labels"])
    # the reported accuracy is the exported anchors' accuracy on the test split
    np.testing.assert_allclose(summary["best_top1"], top1, rtol=1e-6)
    kinds = [json.loads(line)["kind"] for line in (psc_run / "metrics.jsonl").open()]
    assert kinds == ["step", "epoch"]
    assert json.loads((psc_run / "config.json").read_text())["n_ctx"] == 4


def test_psc_step_on_8_devices_matches_1(teacher, psc_run, tmp_path):
    import jax

    from pand_jax import prompts

    out = run_train(PSC_ARGS + ["--teacher", teacher, "--workdir", tmp_path], devices=8)
    # The start line comes first.
    assert out.stdout.startswith("devices: 8 x cpu (cpu), 1 process, compute float32\n")
    ctx0 = prompts.init_context(jax.random.key(0), 4, 64, 0.02)  # seed 0, n_ctx 4, width 64
    assert_updates_close(latest_state(tmp_path)["ctx"], latest_state(psc_run)["ctx"], ctx0, 1e-4)


def test_fsdp_teacher_on_8_devices_matches_1_replicated(teacher, psc_run, nsd_steps_run, tmp_path):
    """`--set teacher_sharding=fsdp` through both stages: the teacher's weights split over the
    devices give the replicated teacher's features, context and student steps."""
    import jax

    from pand_jax import prompts

    fsdp = ["--set", "teacher_sharding=fsdp"]
    run_train(PSC_ARGS + fsdp + ["--teacher", teacher, "--workdir", tmp_path / "psc"], devices=8)
    for split in ("train", "test"):
        with (
            np.load(tmp_path / "psc" / f"features_{split}.npz") as got,
            np.load(psc_run / f"features_{split}.npz") as want,
        ):
            np.testing.assert_allclose(got["features"], want["features"], rtol=0, atol=1e-6)
    ctx0 = prompts.init_context(jax.random.key(0), 4, 64, 0.02)
    assert_updates_close(
        latest_state(tmp_path / "psc")["ctx"], latest_state(psc_run)["ctx"], ctx0, 1e-4
    )
    args = NSD_STEPS_ARGS + fsdp + ["--teacher", teacher, "--anchors", psc_run / "anchors.npz"]
    run_train(args + ["--workdir", tmp_path / "nsd"], devices=8, env=ONEDNN)
    assert_epoch_matches(tmp_path / "nsd", nsd_steps_run, 1)


def test_nsd_step_on_8_devices_matches_1(teacher, psc_run, nsd_steps_run, tmp_path):
    """BatchNorm in training mode over a batch sharded 1 example per device: the statistics
    must be the global batch's (sync BN) for the step to match."""
    args = NSD_STEPS_ARGS + ["--teacher", teacher, "--anchors", psc_run / "anchors.npz"]
    run_train(args + ["--workdir", tmp_path / "scratch"], devices=8, env=ONEDNN)
    assert_epoch_matches(tmp_path / "scratch", nsd_steps_run, 1)
    summary = json.loads((tmp_path / "scratch" / "summary.json").read_text())
    assert summary["devices"] == 8 and summary["method"] == "pand"
    assert summary["compute_dtype"] == "float32"

    epoch_2 = start_epoch_2_from(nsd_steps_run, tmp_path / "epoch2")
    out = run_train(args + ["--workdir", epoch_2], devices=8, env=ONEDNN)
    assert "resuming from" in out.stdout and "at epoch 1, step 0" in out.stdout, out.stdout
    assert_epoch_matches(epoch_2, nsd_steps_run, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(teacher, psc_run, workdir, signal_at=None):
    """The NSD_STEPS run as two processes of one job, started in the background (with the
    signal `signal_at` raised in the training loop, see tests/signal_at.py)."""
    args = NSD_STEPS_ARGS + [
        "--teacher",
        teacher,
        "--anchors",
        psc_run / "anchors.npz",
        "--workdir",
        workdir,
        "--coordinator",
        f"localhost:{_free_port()}",
        "--num-processes",
        "2",
    ]
    return [
        run_train(args + ["--process-id", i], background=True, env=ONEDNN, signal_at=signal_at)
        for i in (0, 1)
    ]


def _finish(procs) -> list[str]:
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    return outs


def test_two_processes_match_one_in_epoch_2(teacher, psc_run, nsd_steps_run, tmp_path):
    """Epoch 2 as two processes, from the one-process run's state after epoch 1 (epoch 1 as
    two processes is the next test's)."""
    outs = _finish(_two_processes(teacher, psc_run, start_epoch_2_from(nsd_steps_run, tmp_path)))
    assert "at epoch 1, step 0" in outs[0], outs[0][-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert_epoch_matches(tmp_path, nsd_steps_run, 2)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    teacher, psc_run, nsd_steps_run, tmp_path
):
    """A preempted host: only process 1 gets SIGTERM (raised by its loop as the first step
    starts, see tests/signal_at.py). Both processes stop after the same step with one checkpoint
    (before, the other ran on into a collective and both hung), and the resumed pair's first
    epoch ends where one process's does."""
    procs = _two_processes(teacher, psc_run, tmp_path, signal_at="SIGTERM:1:0:1")
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    stops = [[line for line in out.splitlines() if "checkpoint saved" in line] for out in outs]
    assert stops[0] and stops[0] == stops[1], "\n".join(out[-3000:] for out in outs)
    assert [p.returncode for p in procs] == [1, 1]
    assert not (tmp_path / "summary.json").exists()
    # The epoch-1 checkpoint (step 2) is there now if the pair stopped at step 2 or later (the
    # step the two agree on is JAX's choice), else after the rerun (which keeps 2 checkpoints).
    stopped_after_epoch_1 = 2 in checkpoint_steps(tmp_path)
    if stopped_after_epoch_1:
        assert_epoch_matches(tmp_path, nsd_steps_run, 1)

    assert "resuming" in _finish(_two_processes(teacher, psc_run, tmp_path))[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    if not stopped_after_epoch_1:
        assert_epoch_matches(tmp_path, nsd_steps_run, 1)


# Three epochs of two steps of VL2Lite (no anchors): the run the stopped and killed runs resume to.
VL2LITE_ARGS = [*NSD_ARGS, "--set", "method=vl2lite", "--set", "anchors=null"]
VL2LITE_ARGS[VL2LITE_ARGS.index("--epochs") + 1] = "3"
VL2LITE_ARGS[VL2LITE_ARGS.index("max_steps_per_epoch=1")] = "max_steps_per_epoch=2"


@pytest.fixture(scope="module")
def vl2lite_run(teacher, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("vl2lite")
    run_train(VL2LITE_ARGS + ["--teacher", teacher, "--workdir", workdir])
    return workdir


def test_killed_run_resumes_to_the_same_params(teacher, vl2lite_run, tmp_path):
    """SIGKILL in epoch 2 after its first step, once epoch 1's checkpoint is written: the rerun
    resumes from that checkpoint and ends where the uninterrupted run ends."""
    args = VL2LITE_ARGS + ["--teacher", teacher, "--workdir", tmp_path]
    killed = run_train(args, check=False, signal_at="SIGKILL:2:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [2]  # epoch 1's, whole
    assert not (tmp_path / "summary.json").exists()

    out = run_train(args)
    assert "resuming from" in out.stdout and "at epoch 1, step 0" in out.stdout, out.stdout
    assert_trees_close(latest_state(tmp_path), latest_state(vl2lite_run), 1e-6, 1e-7)
    history = json.loads((tmp_path / "summary.json").read_text())
    assert history["epochs"] == 3
    assert (
        history["last_top1"] == json.loads((vl2lite_run / "summary.json").read_text())["last_top1"]
    )


def test_sigterm_inside_an_epoch_resumes_to_the_same_params(teacher, vl2lite_run, tmp_path):
    """SIGTERM between the two steps of epoch 1 (raised by the loop as the first step starts,
    taken after it): the loop checkpoints where it is, and the run resumed from there equals
    the uninterrupted one."""
    args = VL2LITE_ARGS + ["--teacher", teacher, "--workdir", tmp_path]
    stopped = run_train(args, check=False, signal_at="SIGTERM:1:0")
    assert stopped.returncode == 1, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert (
        "[nsd] stopped at epoch 1, step 1; checkpoint saved. Run the same command again to resume."
    ) in stopped.stderr, stopped.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [1]
    assert not (tmp_path / "summary.json").exists()

    resumed = run_train(args)
    assert "at epoch 0, step 1" in resumed.stdout, resumed.stdout
    assert_trees_close(latest_state(tmp_path), latest_state(vl2lite_run), 1e-6, 1e-7)
    summary = json.loads((vl2lite_run / "summary.json").read_text())
    assert summary["images_per_second"] > 0  # 5 timed steps after the compiled first one


def test_cached_teacher_gives_the_online_trajectory(teacher, tmp_path):
    """With V views, caching the teacher changes where its embeddings come from, not what
    they are: two epochs with the fp32 cache follow the online run on the same views."""
    args = NSD_ARGS + [
        "--teacher",
        teacher,
        "--no-psc",
        "--teacher-cache",
        "2",
        "--set",
        "teacher_cache_dtype=float32",
    ]
    args[args.index("--epochs") + 1] = "2"
    run_train(args + ["--workdir", tmp_path / "cached"])
    run_train(args + ["--workdir", tmp_path / "online", "--set", "teacher_cache_online=true"])
    assert (tmp_path / "cached" / "teacher_cache").is_dir()
    assert not (tmp_path / "online" / "teacher_cache").exists()
    assert_trees_close(
        latest_state(tmp_path / "cached"), latest_state(tmp_path / "online"), 1e-5, 1e-6
    )
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["teacher_cache_views"] == 2


def test_demo_learns_well_above_chance(tmp_path):
    """The README's main job, shortened, with the teacher cache: the demo teacher, PSC and
    NSD all learn digits."""
    out = run_train(
        [
            "--demo",
            "--workdir",
            tmp_path,
            "--teacher-cache",
            "2",
            "--set",
            "teacher:steps=150",
            "--set",
            "psc:epochs=2",
            "--set",
            "nsd:epochs=3",
        ]
    )
    psc = json.loads((tmp_path / "psc" / "summary.json").read_text())
    nsd = json.loads((tmp_path / "nsd" / "summary.json").read_text())
    assert psc["best_top1"] > 0.6, out.stdout[-2000:]
    assert nsd["best_top1"] > 0.4, out.stdout[-2000:]
    assert nsd["method"] == "pand" and nsd["learned_anchors"] is True
    assert nsd["teacher_cache_views"] == 2
    assert (tmp_path / "nsd" / "student" / "config.json").is_file()


# ----------------------------------------------------------------- bad input (in process)


def cli(argv, capsys):
    from pand_jax.cli.train import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_anchors_with_wrong_class_count(teacher, tmp_path, capsys):
    from pand_jax import anchors
    from pand_jax.data import get_dataset

    info = get_dataset("digits")
    fake = type("Info", (), {"key": "other", "class_names": info.class_names[:5]})
    anchors.save(tmp_path / "a.npz", np.eye(5, 64, dtype=np.float32), fake)
    code, err = cli(
        NSD_ARGS
        + ["--teacher", teacher, "--anchors", tmp_path / "a.npz", "--workdir", tmp_path / "w"],
        capsys,
    )
    assert code == 2 and "anchors for 5 classes" in err and "digits has 10" in err


def test_anchors_with_wrong_class_names(teacher, tmp_path, capsys):
    from pand_jax import anchors

    names = tuple(f"class {i}" for i in range(10))
    fake = type("Info", (), {"key": "digits", "class_names": names})
    anchors.save(tmp_path / "a.npz", np.eye(10, 64, dtype=np.float32), fake)
    code, err = cli(
        NSD_ARGS
        + ["--teacher", teacher, "--anchors", tmp_path / "a.npz", "--workdir", tmp_path / "w"],
        capsys,
    )
    assert code == 2 and "'class 0' in the anchors but '0' in the dataset" in err


def test_missing_teacher_names_the_convert_command(tmp_path, capsys):
    code, err = cli(
        PSC_ARGS + ["--teacher", tmp_path / "nothing", "--workdir", tmp_path / "w"], capsys
    )
    assert code == 2 and "python convert_weights.py" in err


def test_missing_data_names_the_prepare_command(teacher, tmp_path, capsys):
    code, err = cli(
        [
            "--stage",
            "psc",
            "--dataset",
            "cub",
            "--teacher",
            teacher,
            "--data-dir",
            tmp_path,
            "--workdir",
            tmp_path / "w",
        ],
        capsys,
    )
    assert code == 2 and "python -m pand_jax.data.prepare --dataset cub" in err


def test_unknown_dataset_lists_the_valid_ones(teacher, tmp_path, capsys):
    code, err = cli(
        ["--stage", "psc", "--dataset", "mnist", "--teacher", teacher, "--workdir", tmp_path / "w"],
        capsys,
    )
    assert code == 2 and "'mnist'" in err and "aircraft" in err and "cub" in err


def test_workdir_with_another_config_is_refused(teacher, psc_run, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(psc_run, workdir)
    argv = PSC_ARGS + ["--teacher", teacher, "--workdir", workdir, "--set", "optimizer.lr=0.1"]
    code, err = cli(argv, capsys)
    assert code == 2 and "different config" in err and "optimizer.lr: 0.002 -> 0.1" in err


def test_workdir_from_before_a_new_config_key_resumes(teacher, psc_run, tmp_path, capsys):
    """A workdir written by a version without some config key resumes: the key's default is
    what that run used, so it is no config change."""
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(psc_run, workdir)
    recorded = json.loads((workdir / "config.json").read_text())
    del recorded["skip_bad_images"], recorded["optimizer"]["momentum"]
    (workdir / "config.json").write_text(json.dumps(recorded))
    code, err = cli(PSC_ARGS + ["--teacher", teacher, "--workdir", workdir], capsys)
    assert code == 0, err
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["momentum"] == 0.9


def test_unknown_config_key(capsys):
    code, err = cli(PSC_ARGS + ["--set", "optimizer.lrr=0.1"], capsys)
    assert code == 2 and "optimizer.lrr" in err and "'lr'" in err


def test_pand_without_anchors_names_psc(teacher, tmp_path, capsys):
    code, err = cli(
        NSD_ARGS
        + ["--teacher", teacher, "--anchors", tmp_path / "none.npz", "--workdir", tmp_path / "w"],
        capsys,
    )
    assert code == 2 and "python train.py --stage psc --dataset digits" in err


def test_batch_not_divisible_by_devices(teacher, tmp_path):
    out = run_train(
        PSC_ARGS + ["--batch-size", "12", "--teacher", teacher, "--workdir", tmp_path],
        devices=8,
        check=False,
    )
    assert out.returncode == 2
    assert "config batch_size = 12: expected a multiple of the 8 devices" in out.stderr


def test_corrupt_checkpoint_is_reported(teacher, psc_run, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(psc_run, workdir)
    for f in (workdir / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts and f.stat().st_size > 64:
            f.write_bytes(b"\0" * 16)
    code, err = cli(PSC_ARGS + ["--teacher", teacher, "--workdir", workdir], capsys)
    assert code == 2 and "can be restored" in err and "--workdir" in err


def test_unknown_train_split_lists_the_splits(teacher, tmp_path, capsys):
    code, err = cli(
        PSC_ARGS
        + ["--teacher", teacher, "--workdir", tmp_path / "w", "--set", "train_split=trainval"],
        capsys,
    )
    assert code == 2 and "'trainval'" in err and "train" in err and "test" in err


@pytest.mark.parametrize(
    "env, several",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),  # a single-task SLURM job must not wait for a cluster
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "host0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ],
)
def test_multi_process_launch_detection(monkeypatch, env, several):
    from pand_jax import devices

    for key in (
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert devices._launched_as_several_processes() is several
