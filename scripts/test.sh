#!/usr/bin/env bash
# Lint, type-check and run the test suite.   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${SPLITFT_VENV:-.venv}/bin

echo "== ruff"
"$PY/ruff" check .
"$PY/ruff" format --check .
echo "== mypy"
# mypy cannot follow setuptools' package-dir mapping: give it the same layout as symlinks.
mkdir -p build/typecheck/splitft
for part in agent coordinator shared; do ln -sfn "../../../$part" "build/typecheck/splitft/$part"; done
MYPYPATH=build/typecheck "$PY/mypy" -p splitft.shared -p splitft.agent -p splitft.coordinator
echo "== pytest"
"$PY/python" -m pytest -q "$@"
