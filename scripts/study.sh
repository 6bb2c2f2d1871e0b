#!/usr/bin/env bash
# The benchmark study: every method (centralised LoRA, federated LoRA without a split, fixed cut, the
# paper's rule, splitft) on the same emulated five-device fleet, GSM8K partition, base and budget.
#   bash scripts/study.sh --quick                  # about 12 minutes on 2 cores, base model included
#   bash scripts/study.sh                          # the full study (about 55 minutes, 10 more for the base)
#   bash scripts/study.sh --quick --write BENCHMARKS.md
# Results go to study-quick/ or study-full/ (see python scripts/study.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${SPLITFT_VENV:-.venv}/bin/python" scripts/study.py "$@"
