"""Settings of the whole test run, and runs shared by several test files: `train.py` on
`digits` with a tiny random CLIP teacher (session fixtures, made once per test run and shared
by pytest-xdist's workers: `made_once`).

Compiled programs go to a JAX persistent compilation cache outside the clone, one directory per
JAX and jaxlib version, that this process and every subprocess it starts (train.py, bench/) read
and write: the suite compiles the same steps many times over, in many processes. JAX keys each
entry by the program, its compile options, XLA_FLAGS and the backend, and an entry holds the very
executable a fresh compilation gives (oneDNN's custom calls are looked up by name when it loads),
so a test passes or fails the same with it, cold or warm. `JAX_COMPILATION_CACHE_DIR=` (empty)
switches it off; a directory already set there is used instead. With a size limit JAX locks the
cache (filelock), which the two-process runs and xdist's workers need: without the lock a reader
can meet an entry being written.

The suite's programs are compiled with LLVM's optimisation level 1 instead of XLA's default 2
(`TEST_XLA_FLAGS`, passed on to every subprocess by `cpu_env`): compilation is most of a cold run,
and at level 1 it is a quarter shorter while the tiny models run almost as fast; level 0 is
shorter still but makes the demo's training test a third slower (bench/RESULTS.md, "Test
suite"). XLA's graph passes, which decide fusion and the order of sums, run as before. A level
already set in XLA_FLAGS is kept.

Hypothesis runs derandomized everywhere (the `ci` profile): the same examples on every run and
machine, so a failure reproduces and a pass is not luck. `--hypothesis-profile explore` searches
afresh."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys


def _compilation_cache() -> str:
    versions = "-".join(importlib.metadata.version(d) for d in ("jax", "jaxlib"))
    base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return str(base / "pand_jax" / f"jax-tests-{versions}")


TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
for key, value in {
    "JAX_COMPILATION_CACHE_DIR": _compilation_cache(),  # before JAX reads them
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}.items():
    os.environ.setdefault(key, value)

import filelock  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import settings  # noqa: E402

from pand_jax.xla_cpu import prefer_eigen_convolutions  # noqa: E402

# The tools' XLA:CPU option, in XLA_FLAGS before any test runs JAX (and in every subprocess's).
prefer_eigen_convolutions()

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None)
settings.load_profile("ci")

REPO = pathlib.Path(__file__).resolve().parents[1]

# One optimizer step per epoch on 8 examples keeps every run to seconds after compilation.
PSC_ARGS = [
    "--stage",
    "psc",
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--set",
    "max_steps_per_epoch=1",
    "--set",
    "feature_image_size=32",
    "--set",
    "feature_batch_size=64",
    "--set",
    "dtype=float32",
    "--set",
    "n_ctx=4",
]
NSD_ARGS = [
    "--stage",
    "nsd",
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--set",
    "max_steps_per_epoch=1",
    "--set",
    "student_weights=null",
    "--set",
    "host_image_size=36",
    "--set",
    "image_size=32",
    "--set",
    "augment=rrc",
    "--set",
    "eval_batch_size=64",
    "--set",
    "dtype=float32",
    # AdamW's first step is lr * g / (|g| + eps): with PyTorch's eps 1e-8 a gradient of
    # 1e-9 moves a weight by +-lr, so reduction-order noise between device counts would
    # show as full-size differences. A larger eps keeps the update linear in g.
    "--set",
    "optimizer.eps=1e-3",
]


def cpu_env(devices: int = 1, xla_flags: str = "", **extra) -> dict:
    """The environment of a subprocess on `devices` fake CPU devices: this run's XLA_FLAGS
    (`TEST_XLA_FLAGS`), the device count and `xla_flags` after them, and `extra`."""
    flags = (
        f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices} {xla_flags}"
    )
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip(), **extra}


def run_train(args, *, devices=1, check=True, background=False, env=None, signal_at=None):
    """Runs train.py on `devices` fake CPU devices (with `env` added to the environment, its
    XLA_FLAGS after the device count); `background` returns the Popen. `signal_at`
    (NAME:EPOCH:STEP[:PROCESS]) raises that signal in the training loop just before that step
    (tests/signal_at.py)."""
    env = dict(env or {})
    env = cpu_env(devices, env.pop("XLA_FLAGS", ""), PYTHONUNBUFFERED="1", **env)
    script = (
        [str(REPO / "tests" / "signal_at.py"), signal_at] if signal_at else [str(REPO / "train.py")]
    )
    cmd = [sys.executable, *script, *map(str, args)]
    if background:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(map(str, args))} failed:\n"
            f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
        )
    return out


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
    """The folder `name` that `make(path)` fills once per test run. Under pytest-xdist
    (scripts/test.sh runs two workers) the workers share it, in the base temp they have in
    common: the first to take its lock makes it, the others wait and then read it. A folder
    left half-made by a failed `make` is made again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path, done = base / name, base / f"{name}.done"
    with filelock.FileLock(base / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> pathlib.Path:
    """A random tiny CLIP with the real tokenizer's vocabulary (configs/demo.json)."""

    def make(path):
        from pand_jax.models.clip import CLIP, save_clip
        from pand_jax.train import demo

        clip = CLIP(demo.teacher_config(demo.demo_config()["teacher"]), rngs=nnx.Rngs(0))
        save_clip(path, clip, teacher_id="test-teacher")

    return made_once(tmp_path_factory, "teacher", make)


@pytest.fixture(scope="session")
def psc_run(teacher, tmp_path_factory) -> pathlib.Path:
    return made_once(
        tmp_path_factory,
        "psc1",
        lambda workdir: run_train(PSC_ARGS + ["--teacher", teacher, "--workdir", workdir]),
    )


@pytest.fixture(scope="session")
def nsd_run(teacher, psc_run, tmp_path_factory) -> pathlib.Path:
    return made_once(
        tmp_path_factory,
        "nsd1",
        lambda workdir: run_train(
            NSD_ARGS
            + ["--teacher", teacher, "--anchors", psc_run / "anchors.npz", "--workdir", workdir]
        ),
    )
