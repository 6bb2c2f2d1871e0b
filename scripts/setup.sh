#!/usr/bin/env bash
# Set up SplitFT in a virtual environment (.venv beside this folder's parent); safe to run again.
#   bash scripts/setup.sh
# PyTorch goes in first, pinned to 2.13.0 (a CPU build where no CUDA build is at hand), so that
# nothing that depends on torch pulls a multi-GB CUDA build of a newer release.
# One line per stage; pip's output goes to $VENV/setup.log, printed in full only if a stage fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SPLITFT_VENV:-.venv}

# Re-install only when the project's metadata changed since the last set-up.
stamp="$VENV/.splitft-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

mkdir -p "$VENV"
log="$(cd "$VENV" && pwd)/setup.log"
: > "$log"
stage() {  # stage "what" command...: one line, the command's output into the log
    local what=$1
    shift
    printf 'setup: %s ... ' "$what"
    local started=$SECONDS
    if "$@" >>"$log" 2>&1; then
        echo "ok ($((SECONDS - started)) s)"
    else
        echo "FAILED"
        echo "---- $log" >&2
        cat "$log" >&2
        echo "---- setup failed at: $what (the log above is kept in $log)" >&2
        exit 1
    fi
}

if [ ! -x "$VENV/bin/python" ]; then
    stage "creating $VENV with $($PYTHON --version 2>&1)" "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
stage "upgrading pip" "$PY" -m pip install --quiet --upgrade pip
stage "installing torch==2.13.0" "$PY" -m pip install --quiet "torch==2.13.0"
stage "installing SplitFT (editable, with the dev tools)" "$PY" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)); log: $log"
