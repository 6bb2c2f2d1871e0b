"""The SplitFT benchmark study: every method on the same emulated fleet, data, base model and token budget.

    python scripts/study.py --quick                      # about 12 minutes on 2 cores (base model included)
    python scripts/study.py                              # the full study (about 55 minutes, 10 more for the base)
    python scripts/study.py --write BENCHMARKS.md        # and replace the study's section there

Methods, each on the same length-Dirichlet partition of GSM8K train among five devices (Jetson Nano,
2 x Jetson Orin Nano, Raspberry Pi 5, laptop), for each alpha:

* ``centralised``: LoRA in one process on the pooled data, one step on every device's batch at once
  (the quality reference; its data would have to leave the devices);
* ``fedavg``: federated LoRA without a split: every block and the head on the device, adapters
  averaged (by tokens) each round; run in this process, device by device;
* ``fixed``: SplitFT's runtime with one cut for all (SplitLoRA / SFL style), uniform LoRA rank;
* ``paper``: the SplitFT paper's rule (cuts follow local accuracy), uniform rank;
* ``splitft``: the ``splitft`` policy (latency-optimal cuts, performance term, hysteresis) with the
  lower rank at the cut blocks.

The split methods are real runs: a Mosquitto broker (the embedded one when Mosquitto is missing), the
coordinator, and five ``splitft-agent join`` processes emulating the devices *virtually* (they report
their profiles' compute times without waiting for them, agent/emulation.py). Time is measured twice:
host wall time, and a simulated clock (splitft.bench.clock) that replays every round on the
devices' profiles against a server ``--server-speedup`` times faster than this host (a GPU server's
stand-in; the coordinator's controller plans with the same speed-up). The wire-dtype study reruns
``splitft`` with fp32, bf16 and int8 activations (fp16 is the main run).

Written to ``--out``: ``runs/<alpha>/<method>/rounds.jsonl`` (one line per round: simulated and wall
time, eval perplexity and accuracy, bytes, cuts), the split runs' coordinator metrics and logs,
``summary.jsonl`` (one line per run), ``study.json`` (settings and machine) and the plots
``study_ppl.png``, ``study_bytes.png``, ``study_cuts.png``."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from transformers.utils import logging as hf_logging

from splitft.bench.sections import write_section
from splitft.bench.study.reporting import plot_study, publish, report, section, with_targets
from splitft.bench.study.run import replay_runs, run_study
from splitft.bench.study.settings import FULL, METHODS, QUICK, WIRE_DTYPES, StudySettings, read_jsonl
from splitft.shared.cli_options import check_choices, run_app

app = typer.Typer(add_completion=False)


@app.command(help=__doc__)
def study(
    quick: Annotated[bool, typer.Option("--quick", help="the quick variant (about 12 minutes)")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="results folder (default: study-quick/ or study-full/)")
    ] = None,
    base: Annotated[
        Path | None, typer.Option("--base", help="a base model folder (default: splitft.tools.pretrain's cached build)")
    ] = None,
    alphas: Annotated[
        list[float] | None, typer.Option("--alphas", help="length-Dirichlet alphas, one or more (default 0.1 1.0)")
    ] = None,
    rounds: Annotated[int | None, typer.Option("--rounds")] = None,
    server_speedup: Annotated[float | None, typer.Option("--server-speedup")] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option("--methods", help=f"a subset of the methods (with centralised): {', '.join(METHODS)}"),
    ] = None,
    wire_dtypes: Annotated[
        list[str] | None,
        typer.Option("--wire-dtypes", help=f"the wire-dtype study's dtypes: {', '.join(WIRE_DTYPES)}"),
    ] = None,
    report_only: Annotated[
        bool,
        typer.Option("--report-only", help="replay the split runs of --out, rewrite its report and plots"),
    ] = False,
    write: Annotated[
        Path | None, typer.Option("--write", help="replace the study's section of this markdown file")
    ] = None,
) -> int:
    check_choices("--methods", methods, METHODS)
    check_choices("--wire-dtypes", wire_dtypes, WIRE_DTYPES)
    settings = QUICK if quick else FULL
    changes: dict[str, Any] = {}
    if alphas:
        changes["alphas"] = tuple(alphas)
    if rounds:
        changes["rounds"] = rounds
    if server_speedup:
        changes["server_speedup"] = server_speedup
    if methods:
        changes["methods"] = tuple(methods)
    if wire_dtypes:
        changes["wire_dtypes"] = tuple(wire_dtypes)
    if "alphas" in changes and settings.wire_alpha not in changes["alphas"]:
        changes["wire_alpha"] = changes["alphas"][-1]
    try:
        settings = dataclasses.replace(settings, **changes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    out = out or Path(f"study-{settings.variant}")
    torch.set_num_threads(int(os.environ.get("SPLITFT_STUDY_THREADS", "2")))
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, once per model
    hf_logging.set_verbosity_error()  # not a warning per long GSM8K problem while partitioning
    hf_logging.disable_progress_bar()
    if not report_only:
        run_study(settings, out, base)
    else:  # the settings the results were made with, and their plots again
        recorded = json.loads((out / "study.json").read_text())["settings"]
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
        settings = StudySettings(**fields)
        replay_runs(settings, out)
        summaries = read_jsonl(out / "summary.jsonl")
        plot_study(settings, out, with_targets(out, summaries, settings.target_margin))
    text = report(out)
    print(text)
    if write:
        meta = json.loads((out / "study.json").read_text())
        root = write.resolve().parent
        kept = publish(out, root / "benchmarks" / f"study-{settings.variant}")
        write_section(write, f"study-{settings.variant}", section(meta, text, kept.relative_to(root)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/study.py``: run the study (or replay it) and print its report; returns the exit code."""
    return run_app(app, argv, lists=("--alphas", "--methods", "--wire-dtypes"))
