"""Resolves every install variant against the package index, without installing anything.

    python scripts/check_extras.py        (run it with each Python to check, e.g. 3.11 and 3.12)

For the interpreter running it, on this machine's platform, and for each accelerator extra (none,
cuda12, cuda13, tpu), asks pip which distributions `pip install -c requirements/ci.txt
'.[torch,deploy,test,EXTRA]'` would install (`pip install --dry-run --ignore-installed
--report`: it reads metadata, it installs nothing), prints the JAX side of the answer, and exits
1 when a variant does not resolve or resolves to a JAX other than the pinned one. It needs the
network, so it runs by hand and not in the test suite.
"""

from __future__ import annotations

import json
import pathlib
import platform
import subprocess
import sys
import tempfile

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRAS = ("", "cuda12", "cuda13", "tpu")
SHOWN = (
    "jax",
    "jaxlib",
    "flax",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "libtpu",
    "nvidia-cudnn-cu12",
    "nvidia-cudnn-cu13",
    "torch",
)


def pinned_jax() -> str:
    """The jax version requirements/ci.txt pins for this Python."""
    for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines():
        if line.startswith("jax=="):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                return str(req.specifier).removeprefix("==")
    raise LookupError(f"requirements/ci.txt pins no jax for Python {platform.python_version()}")


def resolve(extra: str) -> dict[str, str]:
    """{distribution name: version} that pip would install, or raises with pip's last line."""
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            "-c",
            str(ROOT / "requirements" / "ci.txt"),
            f"{ROOT}[torch,deploy,test{',' + extra if extra else ''}]",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        return {
            i["metadata"]["name"].lower(): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]
        }


def main() -> int:
    failed = 0
    want = pinned_jax()
    for extra in EXTRAS:
        label = f"python {platform.python_version()} {platform.machine()} [{extra or 'cpu'}]"
        try:
            got = resolve(extra)
        except RuntimeError as e:
            print(f"{label}: FAILED: {e}")
            failed += 1
            continue
        print(f"{label}: " + ", ".join(f"{k} {got[k]}" for k in SHOWN if k in got), flush=True)
        plugin = (
            got.get(f"jax-{extra}-plugin", got["jax"]) if extra.startswith("cuda") else got["jax"]
        )
        if not got["jax"] == got.get("jaxlib") == plugin == want:
            print(f"{label}: FAILED: not the pinned jax {want} with its jaxlib and plugin")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
