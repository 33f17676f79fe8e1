"""The package's shape: layers only import downwards, and the docs are self-contained."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_layers_only_import_downwards():
    """import-linter checks the `layers` contract in pyproject.toml: a module of a lower layer
    importing a higher one (say pand_jax.models importing pand_jax.train) breaks it."""
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_nothing_points_outside_the_repository():
    """A user's clone has only the repository: no file may send them to the developers' notes."""
    pointers = ("REFERENCE" + ".md", "../" + "shared")
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = [
        f
        for f in files
        if (REPO / f).is_file()
        and f.endswith((".py", ".md", ".json", ".toml", ".sh"))
        and any(p in (REPO / f).read_text(errors="ignore") for p in pointers)
    ]
    assert offenders == []
