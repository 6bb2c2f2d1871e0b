#!/usr/bin/env bash
# Set up SplitFT in a virtual environment (.venv beside this folder's parent); safe to run again.
#   bash scripts/setup.sh
# PyTorch goes in first, pinned to 2.13.0 (a CPU build where no CUDA build is at hand), so that
# nothing that depends on torch pulls a multi-GB CUDA build of a newer release.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SPLITFT_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Re-install only when the project's metadata changed since the last set-up.
stamp="$VENV/.splitft-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "setup: installing torch==2.13.0 and SplitFT (editable) into $VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
