#!/usr/bin/env bash
# The main job, for now: show the split plan of the presets and check, step by step, that a split
# training step equals the unsplit model (loss and every LoRA gradient) through the real codec.
# The complete local federated run arrives with the runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=${SPLITFT_VENV:-.venv}/bin

"$BIN/splitft-coordinator" inspect --model tiny-llama --cut 4
for model in tiny-gpt2 tiny-llama; do
    for cut in 1 6 11; do
        "$BIN/splitft-coordinator" verify-split --model "$model" --cut "$cut"
    done
done
"$BIN/splitft-coordinator" verify-split --model tiny-llama --cut 4 --wire int8
