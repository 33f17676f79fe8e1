"""Installing and running on GPUs and TPUs, checked without one: the start line and the idle-GPU
warning with JAX's platform faked, the per-platform compute dtype, the pyproject extras against
the CI pins, scripts/setup.sh's choice of extra (--dry-run, with a fake nvidia-smi), and the
SLURM / TPU examples. Whether the extras resolve on the package index needs the network:
scripts/check_extras.py does that by hand."""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import tomllib
import types

import jax
import pytest
from packaging.requirements import Requirement

from pand_jax import devices
from pand_jax.cli import train as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"


def fake_jax(monkeypatch, platform: str, kinds: list[str], processes: int = 1):
    fakes = [types.SimpleNamespace(device_kind=k, platform=platform) for k in kinds]
    monkeypatch.setattr(jax, "devices", lambda *a: fakes)
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: 0)


def fake_nvidia(monkeypatch, tmp_path, listing: str | None, proc_gpus: int = 0):
    """nvidia-smi on PATH printing `listing` for -L (None: no nvidia-smi), and `proc_gpus`
    entries under a stand-in for /proc/driver/nvidia/gpus."""
    bin_dir, proc = tmp_path / "bin", tmp_path / "gpus"
    bin_dir.mkdir()
    proc.mkdir()
    for i in range(proc_gpus):
        (proc / f"0000:0{i}:00.0").mkdir()
    if listing is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(listing)}\n")
        smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(devices, "NVIDIA_PROC", proc)


@pytest.mark.parametrize(
    "platform, kinds, processes, want",
    [
        ("gpu", [H100] * 8, 1, f"devices: 8 x {H100} (gpu), 1 process, compute bfloat16"),
        (
            "tpu",
            ["TPU v5 lite"] * 16,
            4,
            "devices: 16 x TPU v5 lite (tpu), 4 processes, compute bfloat16",
        ),
        ("cpu", ["cpu"], 1, "devices: 1 x cpu (cpu), 1 process, compute float32"),
    ],
)
def test_start_line_names_devices_processes_and_auto_dtype(
    monkeypatch, capsys, platform, kinds, processes, want
):
    fake_jax(monkeypatch, platform, kinds, processes)
    monkeypatch.setattr(devices, "nvidia_gpu_visible", lambda: False)
    devices.report_devices(devices.compute_dtype("auto"))
    assert capsys.readouterr().out == want + "\n"


def test_explicit_dtype_overrides_the_platform_default(monkeypatch):
    fake_jax(monkeypatch, "gpu", [H100])
    assert devices.compute_dtype("float32") == jax.numpy.float32
    assert devices.device_line(devices.compute_dtype("fp32")).endswith(", compute float32")


@pytest.mark.parametrize(
    "listing, proc_gpus, warned",
    [
        (f"GPU 0: {H100} (UUID: GPU-1234)", 0, True),
        ("No devices were found", 0, False),
        (None, 1, True),  # driver loaded, nvidia-smi not on PATH
        (None, 0, False),
    ],
)
def test_idle_nvidia_gpu_warns_once_with_the_install_command(
    monkeypatch, tmp_path, capsys, listing, proc_gpus, warned
):
    fake_jax(monkeypatch, "cpu", ["cpu"])
    fake_nvidia(monkeypatch, tmp_path, listing, proc_gpus)
    devices.report_devices()
    out, err = capsys.readouterr()
    assert out == "devices: 1 x cpu (cpu), 1 process\n"
    if warned:
        assert err.count("\n") == 1 and "NVIDIA GPU" in err and "bash scripts/setup.sh --gpu" in err
    else:
        assert err == ""


def test_no_warning_when_jax_uses_the_gpu(monkeypatch, tmp_path, capsys):
    fake_jax(monkeypatch, "gpu", [H100])
    fake_nvidia(monkeypatch, tmp_path, f"GPU 0: {H100}", 1)
    devices.report_devices()
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ pyproject and CI pins


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def ci_pins(python: str) -> dict[str, str]:
    """{normalised name: version} pinned in requirements/ci.txt for this Python version."""
    pins = {}
    for line in (REPO / "requirements" / "ci.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"python_version": python}):
                (spec,) = req.specifier
                assert spec.operator == "==", line
                pins[norm(req.name)] = spec.version
    return pins


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_accelerator_extras_are_jaxs_own_with_the_supported_range():
    """The plugin (or libtpu) then always matches the installed JAX exactly."""
    project = pyproject()
    jax_range = next(
        Requirement(r).specifier for r in project["dependencies"] if Requirement(r).name == "jax"
    )
    for extra in ("cuda12", "cuda13", "tpu"):
        (req,) = map(Requirement, project["optional-dependencies"][extra])
        assert req.name == "jax" and req.extras == {extra} and req.specifier == jax_range


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_ci_pins_every_dependency_inside_the_supported_range(python):
    project = pyproject()
    pins = ci_pins(python)
    extras = project["optional-dependencies"]
    names = ("torch", "deploy", "test")
    reqs = [Requirement(r) for r in project["dependencies"] + [r for n in names for r in extras[n]]]
    for req in reqs:
        assert norm(req.name) in pins, f"requirements/ci.txt pins no {req.name}"
        assert req.specifier.contains(pins[norm(req.name)]), (req, pins[norm(req.name)])
    assert pins["jax"] == pins["jaxlib"]


def setup_dry_run(tmp_path, *args, nvidia: str | None = None, driver: str = "580.95.05"):
    """scripts/setup.sh --dry-run with PATH reduced to the tools it uses and, when `nvidia` is
    given, an nvidia-smi that lists it (so a real GPU on the test machine changes nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "head", "cut", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(
            '#!/bin/sh\ncase "$1" in -L) echo "GPU 0: ' + nvidia + '";;\n'
            f"  --query-gpu=driver_version) echo {driver};; esac\n"
        )
        smi.chmod(0o755)
    return subprocess.run(
        [shutil.which("bash"), str(REPO / "scripts" / "setup.sh"), "--dry-run", *args],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "args, nvidia, driver, extras",
    [
        ((), None, "", "torch,deploy,test"),
        ((), H100, "580.95.05", "torch,deploy,test,cuda13"),
        ((), "Tesla V100-SXM2-32GB", "550.54.14", "torch,deploy,test,cuda12"),
        (("--gpu",), None, "", "torch,deploy,test,cuda13"),
        (("--tpu",), None, "", "torch,deploy,test,tpu"),
        (("--cpu",), H100, "580.95.05", "torch,deploy,test"),
    ],
)
def test_setup_picks_the_accelerator_extra(tmp_path, args, nvidia, driver, extras):
    done = setup_dry_run(tmp_path, *args, nvidia=nvidia, driver=driver)
    assert done.returncode == 0, done.stderr
    install = done.stdout.strip().splitlines()[-1]
    assert install == f".venv/bin/python -m pip install -q -c requirements/ci.txt -e .[{extras}]"


def test_setup_rejects_an_unknown_option(tmp_path):
    done = setup_dry_run(tmp_path, "--cuda")
    assert done.returncode == 2 and "--cuda" in done.stderr and done.stdout == ""


# ------------------------------------------------------------------ SLURM and TPU examples


def train_commands(text: str) -> list[list[str]]:
    """The arguments of every `train.py` command in shell text (continuations joined, the
    commands inside `--command="..."` included)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        for w in words:
            if w.startswith("--command="):
                words += shlex.split(w.removeprefix("--command="))
        for i, w in enumerate(words):
            if w == "train.py":
                rest = words[i + 1 :]
                found.append(rest[: rest.index("&&")] if "&&" in rest else rest)
    return found


def parses(args: list[str]):
    ns = cli.parser().parse_args(args)
    return cli.resolve(ns)[:2] if ns.stage else None


def test_slurm_example_is_valid_bash_with_directives_first():
    script = REPO / "examples" / "slurm_nsd.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = [line for line in script.read_text().splitlines()[1:] if line.strip()]
    first_command = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert any(line.startswith("#SBATCH --nodes=") for line in lines[:first_command])
    # sbatch ignores directives after the first command
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    (args,) = train_commands(script.read_text())
    cfg, _ = parses(args)
    assert cfg["stage"] == "nsd" and cfg["dataset"] == "aircraft"


def test_readme_accelerator_commands_parse():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## GPUs and TPUs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [c for b in blocks for c in train_commands(b)]
    assert len(commands) >= 2, commands
    for args in commands:
        parses(args)
    assert "bash scripts/setup.sh --gpu" in section and "bash scripts/setup.sh --tpu" in section
    assert "--worker=all" in section and "examples/slurm_nsd.sbatch" in section
