#!/usr/bin/env bash
# The main job: a complete local federated split fine-tuning. An embedded MQTT broker, the
# coordinator and three agent processes cut at layers 1, 2 and 3 fine-tune the tiny-gpt2 preset
# with LoRA on GSM8K shards; the output (adapter folder, metrics.jsonl, run.png) goes to runs/demo.
#   bash scripts/demo.sh [more splitft-coordinator local options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${SPLITFT_VENV:-.venv}/bin/splitft-coordinator" local --out runs/demo "$@"
