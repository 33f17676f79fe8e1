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


def _functions():
    """(path, function node) of every function in pand_jax/."""
    import ast

    for path in sorted((REPO / "pand_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield path.relative_to(REPO), node


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_60_lines():
    """A function reads as a short list of named steps: its `def` to its last line (as ruff
    formats it) is at most 60 lines."""
    long = [
        f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for path, node in _functions()
        if hasattr(node, "name") and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


# Signatures an outside API dictates: jax.custom_vjp passes its nondiff arguments and the
# residuals positionally, and conv_general_dilated is jax.lax's (flax calls it positionally).
OUTSIDE_SIGNATURES = {
    "conv_general_dilated",
    "_depthwise_vjp",
    "_depthwise_fwd",
    "_depthwise_bwd",
    "_max_pool_vjp",
    "_max_pool_fwd",
    "_max_pool_bwd",
    "_conv",
    "_conv_fwd",
    "_conv_bwd",
}


def test_functions_with_more_than_four_parameters_take_them_by_keyword():
    """At most four positional parameters (self and cls not counted); the rest are keyword-only,
    so a call names what it passes."""
    found = []
    for path, node in _functions():
        a = node.args
        positional = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
        name = getattr(node, "name", "lambda")
        if len(positional) > 4 and name not in OUTSIDE_SIGNATURES:
            found.append(f"{path}:{node.lineno} {name}({', '.join(positional)})")
    assert not found, "\n".join(found)


def test_the_package_has_no_test_only_switches():
    """Tests inject their hooks from outside (`loop.BEFORE_STEP`, tests/signal_at.py): no
    environment variable of the package exists for them."""
    import ast

    found = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted((REPO / "pand_jax").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and str(node.value).startswith("PAND_TEST")
    ]
    assert not found, found
