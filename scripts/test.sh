#!/usr/bin/env bash
# Sets up .venv (see setup.sh), checks the style (ruff: lint and format, configured in
# pyproject.toml) and runs the CPU test suite in two pytest-xdist workers, each test file on one
# of them (a file's fixtures are made once); extra arguments go to pytest, and a later `-n N`
# overrides the two (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -n 2 --dist loadscope "$@"
