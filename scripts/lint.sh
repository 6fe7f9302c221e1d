#!/usr/bin/env bash
# The lint and type gate: ruff (pyflakes, pycodestyle, bugbear, pyupgrade, simplify, isort,
# blind except, unused noqa) and mypy, both configured in pyproject.toml and pinned in its
# [test] extra. CI runs this first (.ci/run); `make lint` runs it by hand. A few seconds.
#
# It uses the Python the tests use: .venv where scripts/testhost.sh made one (python3 refuses
# `pip install`, PEP 668), else python3. Where ruff or mypy is missing, or not the pinned
# version, it installs the project's test dependencies the way testhost.sh does, so that
# mypy sees the same libraries (pydantic, SQLAlchemy, FastAPI...) on every machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
}

# True when ruff and mypy are installed at the versions pyproject.toml pins.
tools_ok() {
    "$PY" - <<'PYEOF' 2>/dev/null
import sys, tomllib
from importlib import metadata
test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
pins = dict(r.split("==", 1) for r in test if r.startswith(("ruff==", "mypy==")))
try:
    sys.exit(0 if pins and all(metadata.version(n) == v for n, v in pins.items()) else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PYEOF
}

pick_python
if ! tools_ok; then
    echo "lint: ruff/mypy missing or not the pinned version: installing the test dependencies"
    bash scripts/testhost.sh install
    pick_python  # testhost.sh may have created .venv
    tools_ok || { echo "lint: error: ruff/mypy still not installed at the pinned versions" >&2; exit 1; }
fi

echo "lint: ruff check ."
"$PY" -m ruff check .
echo "lint: imports"
"$PY" -m pytest -q -p no:cacheprovider tests/test_layout.py
echo "lint: mypy"
# mypy finds modules by path; it reads the product laid out as it is installed.
rm -rf .typecheck && mkdir -p .typecheck/virtwarden
for entry in virtwarden/*; do ln -s "$PWD/$entry" ".typecheck/virtwarden/"; done
for folder in worker tasks catalog policies hypervisor storage_backends; do
    ln -s "$PWD/$folder" ".typecheck/virtwarden/$folder"
done
"$PY" -m mypy
