"""A disk that refuses a write, on every write path: one `error:` line naming the file, the size
it needs and what to do, exit 2, raised in the step where it happened, and no temporary file
left. The refusal is real: each case runs in a subprocess under a file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored so the write fails with EFBIG, as ENOSPC would)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

from pand_jax.train import features

REPO = pathlib.Path(__file__).resolve().parents[1]


def limited(code: str, limit: int, *args) -> subprocess.CompletedProcess:
    """Runs `code` (argv[1:] = `args`) in a fresh Python under a file-size limit of `limit`
    bytes; the limit is set by the code itself, after the imports it needs."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        def limit_files():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left to write "), out.stderr
    assert (
        "the disk refused (File too large)" in lines[0] and "run the same command again" in lines[0]
    ), lines
    return lines[0]


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.rglob("*")
        if "tmp" in p.name or "partial" in p.name or p.name.startswith(".reserve")
    )


def test_psc_features(tmp_path):
    out = limited(
        """
        import pathlib, numpy as np
        from pand_jax.cli import common
        from pand_jax.train import features
        limit_files()
        arrays = {"features": np.ones((256, 1024), np.float32)}
        sys.exit(common.run(lambda: features.cached_arrays(pathlib.Path(sys.argv[1]), {"k": 1},
                                                           lambda: arrays)))
    """,
        65536,
        tmp_path / "features_train.npz",
    )
    line = one_error(out)
    assert f"the feature cache {tmp_path / 'features_train.npz'}: it needs about 1.0 MiB" in line
    assert list(tmp_path.iterdir()) == []


def test_damaged_psc_features_are_recomputed(tmp_path, capsys):
    """numpy reads .npz members through zipfile, which checks each member's CRC-32: bytes
    damaged in the middle of the file are found, and the arrays are computed again."""
    path = tmp_path / "features_train.npz"
    arrays = {
        "features": np.arange(64 * 256, dtype=np.float32).reshape(64, 256),
        "labels": np.arange(64),
    }
    features.cached_arrays(path, {"k": 1}, lambda: arrays)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = b"\xff" * 8  # inside the features member's data
    path.write_bytes(bytes(data))
    capsys.readouterr()
    calls = []
    got = features.cached_arrays(path, {"k": 1}, lambda: calls.append(1) or arrays)
    assert calls == [1]
    assert capsys.readouterr().out.splitlines() == [
        f"warning: recomputing {path}: it could not be read (BadZipFile)"
    ]
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])
    reread = features.cached_arrays(path, {"k": 1}, lambda: calls.append(1) or arrays)
    np.testing.assert_array_equal(reread["features"], arrays["features"])
    assert calls == [1]  # the file written again is whole


def test_host_image_cache(tmp_path):
    out = limited(
        """
        from pand_jax.cli import common
        from pand_jax.data import load_split
        from pand_jax.data.pipeline import Loader
        source = load_split("digits", "train")
        limit_files()
        sys.exit(common.run(lambda: Loader(source, global_batch_size=64, image_size=32,
                                           train=True, process_index=0, process_count=1,
                                           threads=2, cache_dir=sys.argv[1])))
    """,
        1 << 20,
        tmp_path,
    )
    line = one_error(out)
    assert (
        "the image cache " + str(tmp_path / "digits") in line
        and ".images.npy: it needs about 3.9 MiB" in line
        and "set host_cache_dir to a disk with room" in line
    ), line
    assert list(tmp_path.iterdir()) == []


CHECKPOINTS = """
    import jax.numpy as jnp
    from pand_jax import files
    from pand_jax.cli import common
    from pand_jax.train.checkpoint import Checkpointer
    if sys.argv[2] == "background":  # the disk fills up after the space was reserved
        files.reserve = lambda directory, size: None
    ckpt = Checkpointer(sys.argv[1])
    import numpy as np
    # 64 bytes and 1 MiB; random, since orbax compresses its chunks
    small, big = ({"w": jnp.asarray(np.random.default_rng(0).random(n, np.float32))}
                  for n in (16, 1 << 18))
    limit_files()

    def run():
        for step, state in ((1, small), (2, big), (3, big)):
            ckpt.save(step, state, {"epoch": step})
            ckpt.wait() if step == 1 else None
            print("saved", step)
        ckpt.close()
    sys.exit(common.run(run))
"""


def test_checkpoint_is_refused_at_its_own_step(tmp_path):
    """Before the fix the refusal surfaced at the next save (an epoch later), as 440 lines of
    orbax's thread tracebacks, and offered to resume from checkpoint None."""
    out = limited(CHECKPOINTS, 65536, tmp_path / "checkpoints", "reserve")
    line = one_error(out)
    assert out.stdout.splitlines() == ["saved 1"]  # the save of step 2 raised
    assert (
        f"checkpoint 2 in {tmp_path / 'checkpoints'}: a checkpoint needs about 1.0 MiB" in line
        and line.endswith("to resume from checkpoint 1")
    ), line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_checkpoint_refused_in_the_background_is_one_line(tmp_path):
    out = limited(CHECKPOINTS, 65536, tmp_path / "checkpoints", "background")
    line = one_error(out)
    assert out.stdout.splitlines() == ["saved 1", "saved 2"]  # found when step 3 waits for it
    assert "checkpoint 2 in" in line and line.endswith("to resume from checkpoint 1"), line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_student_export_keeps_the_previous_copy(tmp_path):
    out = limited(
        """
        import pathlib
        from flax import nnx
        from pand_jax import weights
        from pand_jax.cli import common
        path = pathlib.Path(sys.argv[1])
        weights.save_module(path, nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {"kind": "old"})
        limit_files()
        sys.exit(common.run(lambda: weights.save_module(
            path, nnx.Linear(512, 512, rngs=nnx.Rngs(0)), {"kind": "new"})))
    """,
        65536,
        tmp_path / "student",
    )
    line = one_error(out)
    assert f"the weights {tmp_path / 'student'}: it needs about 1.0 MiB" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    from pand_jax import weights

    assert weights.read_meta(tmp_path / "student")["kind"] == "old"


def test_metrics_keep_whole_records_and_never_hang(tmp_path):
    """tensorboardX's SummaryWriter blocked forever once its writer thread had died on the
    refusal (the subprocess's timeout ends such a run)."""
    out = limited(
        """
        import json, pathlib
        from pand_jax.cli import common
        from pand_jax.train.metrics import MetricsWriter
        metrics = MetricsWriter(pathlib.Path(sys.argv[1]))
        limit_files()

        def run():
            for step in range(1000):
                metrics.write("step", step, {"loss": 1.0 / (step + 1), "lr": 0.1})
        sys.exit(common.run(run))
    """,
        4096,
        tmp_path,
    )
    line = one_error(out)
    assert (
        "the metrics of step " in line
        and f"to {tmp_path / 'metrics.jsonl'}: it needs about " in line
    ), line
    records = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert records and all(r.endswith("\n") for r in records)
    step = int(line.split("the metrics of step ")[1].split()[0])
    assert [__import__("json").loads(r)["step"] for r in records] == list(range(step))


def test_reproduce_figures_and_tables(tmp_path):
    """gather writes results.csv, results.md and every figure through `files.write_file`."""
    out = limited(
        """
        import pathlib
        from matplotlib.figure import Figure
        from pand_jax.cli import common
        from pand_jax.experiments import figures
        fig = Figure(figsize=(8, 6))
        fig.subplots().imshow(__import__("numpy").random.default_rng(0).random((200, 200)))
        limit_files()
        sys.exit(common.run(lambda: figures._save(fig, pathlib.Path(sys.argv[1]))))
    """,
        4096,
        tmp_path / "fig.png",
    )
    line = one_error(out)
    assert f"the figure {tmp_path / 'fig.png'}: it needs about " in line, line
    assert list(tmp_path.iterdir()) == []
