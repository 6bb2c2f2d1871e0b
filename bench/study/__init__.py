"""The SplitFT benchmark study: every method on the same emulated fleet, data, base model and token budget.

What it runs and writes is described in :mod:`.cli` (the command's help, ``python scripts/study.py --help``).
Modules: :mod:`.settings` (the variants, fleet, methods), :mod:`.methods` (how each method trains),
:mod:`.run` (the whole study), :mod:`.reporting` (plots and the report), :mod:`.cli`.
"""

from splitft.bench.study.cli import main
from splitft.bench.study.reporting import plot_study, publish, report, section, time_to, with_targets
from splitft.bench.study.run import replay_runs, run_study, summarise
from splitft.bench.study.settings import (
    FLEET,
    FULL,
    METHODS,
    QUICK,
    SPLIT_METHODS,
    WIRE_DTYPES,
    StudySettings,
    read_jsonl,
    write_jsonl,
)

__all__ = [
    "FLEET", "FULL", "METHODS", "QUICK", "SPLIT_METHODS", "WIRE_DTYPES", "StudySettings", "main", "plot_study",
    "publish", "read_jsonl", "replay_runs", "report", "run_study", "section", "summarise", "time_to", "with_targets",
    "write_jsonl",
]  # fmt: skip
