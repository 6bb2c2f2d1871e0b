#!/usr/bin/env bash
# The main job: a complete local federated split fine-tuning. It pretrains (or finds cached) a small base
# model on the vendored WikiText-2 and E2E text (6 blocks, about 1.5 minutes on 2 cores the first time),
# then an embedded MQTT broker, the coordinator and three agent processes fine-tune it with LoRA on GSM8K
# shards; the output (adapter folder, metrics.jsonl, run.png) goes to runs/demo.
#   bash scripts/demo.sh [more splitft-coordinator local options]
# With --model (a preset such as tiny-gpt2, or a model folder) or --config, no base is pretrained.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${SPLITFT_VENV:-.venv}/bin
model=()
case " $* " in
*" --model "* | *" --model="* | *" --config "* | *" --config="*) ;;
*)
    base=$("$PY/python" scripts/pretrain_base.py --demo)
    model=(--model "$base")
    ;;
esac
"$PY/splitft-coordinator" local --out runs/demo "${model[@]}" "$@"
