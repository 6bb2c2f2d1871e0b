"""The whole study: every method for every alpha and their summaries."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from splitft.bench.clock import CostModel, Server, server_from, server_label
from splitft.bench.regimes_model import describe_model
from splitft.bench.sections import cpu_name
from splitft.bench.study.hindsight import hindsight_rows
from splitft.bench.study.methods import (
    eval_batches,
    make_fleet,
    memory_estimate_mb,
    replay_split,
    run_centralised,
    run_fedavg,
    run_split,
)
from splitft.bench.study.reporting import plot_study, with_targets
from splitft.bench.study.scoring import final_evaluation
from splitft.bench.study.settings import FLEET, SPLIT_METHODS, StudySettings, read_jsonl, say, write_jsonl
from splitft.bench.study.tasks import Task, prepare_task
from splitft.shared.model.loading import load_config, num_layers
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.tools import pretrain as pretrain_base

# --------------------------------------------------------------------------- the study


def is_hindsight(method: str) -> bool:
    """``fixed-<cut>`` and ``oracle``: replayed from the fixed run, not run (:mod:`.hindsight`)."""
    return method == "oracle" or method.startswith("fixed-")


FINAL_KEYS = ("final_ppl", "final_acc", "gsm8k_correct", "gsm8k_answered", "gsm8k_problems", "bleu", "rouge_l",
              "e2e_problems")  # fmt: skip


@contextlib.contextmanager
def mqtt_broker(folder: Path) -> Iterator[tuple[str, str] | None]:
    """Mosquitto on a free 127.0.0.1 port when installed; else None (the runs use the embedded broker)."""
    from splitft.coordinator import brokers as local_broker

    try:
        binary = local_broker.mosquitto_binary()
    except (FileNotFoundError, RuntimeError, OSError):
        binary = None
    if binary is None:
        say("Mosquitto not found: the split runs use the embedded amqtt broker")
        yield None
        return
    broker = local_broker.start_mosquitto(folder)
    try:
        yield broker.url, "5"
    finally:
        local_broker.stop_broker(broker)


def replay_runs(settings: StudySettings, out: Path) -> None:
    """Replay every split run of ``out`` on the simulated clock again, from its metrics (the clock is a pure
    function of them, the settings and the recorded server rates), and rewrite its rows and summary."""
    meta = json.loads((out / "study.json").read_text())
    base = Path(meta["base"])
    rates = meta["server_tflops"]
    costs = CostModel(load_config(str(base)), Server(rates["blocks"] * 1e12, rates["head"] * 1e12))
    task = prepare_task(settings.task, out / "data")
    summaries = [s for s in read_jsonl(out / "summary.jsonl") if not is_hindsight(s["method"])]
    for i, s in enumerate(summaries):
        if s["method"] not in SPLIT_METHODS:
            continue
        run_dir = out / Path(s["rounds"]).parent
        fleet = make_fleet(settings, base, s["alpha"], run_dir / "partition", task)
        rows = replay_split(settings, base, fleet, costs, read_jsonl(run_dir / "metrics.jsonl"))
        write_jsonl(run_dir / "rounds.jsonl", rows)
        final = {k: v for k, v in s.items() if k in FINAL_KEYS}
        summaries[i] = summarise(settings, base, s["alpha"], s["method"], s["wire_dtype"], rows, final, s["wall_s"])
    summaries += hindsight_summaries(settings, base, out, summaries, costs, task)
    write_jsonl(out / "summary.jsonl", summaries)


def hindsight_summaries(
    settings: StudySettings,
    base: Path,
    out: Path,
    summaries: Sequence[Mapping[str, Any]],
    costs: CostModel,
    task: Task,
) -> list[dict[str, Any]]:
    """Every single cut and the oracle, replayed from each alpha's ``fixed`` run (:mod:`.hindsight`)."""
    derived = []
    for s in summaries:
        if s["method"] != "fixed" or s["wire_dtype"] != "fp16":
            continue
        run_dir = out / Path(s["rounds"]).parent
        fleet = make_fleet(settings, base, s["alpha"], run_dir / "partition", task)
        replays = hindsight_rows(settings, base, fleet, costs, read_jsonl(run_dir / "metrics.jsonl"))
        for label, rows in replays.items():
            path = run_dir / "hindsight" / f"{label}.jsonl"
            path.parent.mkdir(exist_ok=True)
            write_jsonl(path, rows)
            final = {k: v for k, v in s.items() if k in FINAL_KEYS}
            summary = summarise(settings, base, s["alpha"], label, "fp16", rows, final, s["wall_s"])
            derived.append({**summary, "rounds": str(path.relative_to(out)), "replayed_from": "fixed"})
    return derived


def _model_facts(base: Path) -> dict[str, Any]:
    """What the report says of the model: the pretraining facts of the project's tiny base, or its shape."""
    facts_file = base / pretrain_base.FACTS_FILE
    if facts_file.is_file():
        return json.loads(facts_file.read_text())
    shape = describe_model(base.name, str(base), load_config(str(base)))
    return {"model": shape["name"], "family": shape["type"],
            **{k: shape[k] for k in ("parameters", "layers", "hidden", "vocab")}}  # fmt: skip


class StudyMismatch(ValueError):
    """The results folder holds a study made with other settings or another model."""


def _check_resumable(out: Path, meta: Mapping[str, Any]) -> None:
    """Runs already in ``out`` are kept only when they were made with these settings and this model."""
    path = out / "study.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    for key in ("settings", "base"):
        if json.dumps(before.get(key), sort_keys=True) != json.dumps(meta[key], sort_keys=True, default=str):
            raise StudyMismatch(
                f"{out} holds a study made with other {key} ({path}); give another --out, or --fresh to start over"
            )


def run_study(
    settings: StudySettings, out: Path, base: Path | None, fresh: bool = False, model_name: str | None = None
) -> dict[str, Any]:
    """Run every method for every alpha; runs already finished in ``out`` (a ``summary.json`` in their folder,
    same settings and model) are kept, so an interrupted study goes on where it stopped (``fresh``: rerun all)."""
    started = time.perf_counter()
    if fresh:  # this study's own files only
        shutil.rmtree(out / "runs", ignore_errors=True)
        (out / "study.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if base is None:
        pre = pretrain_base.Settings(family="gpt2", tokens=settings.base_tokens) if settings.base_tokens else None
        pre = pre or pretrain_base.Settings(family="gpt2")
        pre = dataclasses.replace(pre, precision="bf16" if pretrain_base.bf16_is_fast("cpu") else "fp32")
        say("base model: pretraining (or the cached build) ...")
        base = pretrain_base.build_base(pre, log=lambda m: say(f"  pretrain: {m}"))
    config = load_config(str(base))
    server = server_from(settings.server)
    costs = CostModel(config, server)
    say(f"model {base}; task {settings.task}; server {settings.server}: {server_label(server)} TFLOP/s (blocks,head)")
    task = prepare_task(settings.task, out / "data")
    tokenizer = load_tokenizer(str(base))
    evals = eval_batches(tokenizer, settings.max_length, settings.eval_samples, task.eval)
    meta = {
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "base": str(base),
        "base_facts": {**_model_facts(base), **({"model": model_name} if model_name else {})},
        "fleet": list(FLEET),
        "host": cpu_name(),
        "threads": torch.get_num_threads(),
        "server": settings.server,
        "server_tflops": {"blocks": server.block_flops_per_s / 1e12, "head": server.head_flops_per_s / 1e12},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/study.py", *sys.argv[1:]]),
    }
    _check_resumable(out, meta)
    (out / "study.json").write_text(json.dumps(meta, indent=2, default=str))
    summaries: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    kept = 0
    plan = [(alpha, method, "fp16") for alpha in settings.alphas for method in settings.methods]
    if "splitft" in settings.methods:
        plan += [(settings.wire_alpha, "splitft", w) for w in settings.wire_dtypes if w != "fp16"]
    with mqtt_broker(out / "broker") as broker:
        for index, (alpha, method, wire) in enumerate(plan, 1):
            label = method if wire == "fp16" else f"{method}-{wire}"
            run_dir = out / "runs" / f"alpha-{alpha:g}" / label
            if (run_dir / "summary.json").is_file():  # finished before an interruption: kept
                summaries.append(json.loads((run_dir / "summary.json").read_text()))
                kept += 1
                say(f"[{index}/{len(plan)}] alpha {alpha:g}: {label}: done before, kept ({run_dir}/summary.json)")
                continue
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            say(f"[{index}/{len(plan)}] alpha {alpha:g}: {label}")
            fleet = make_fleet(settings, base, alpha, run_dir / "partition", task)
            t0 = time.perf_counter()
            try:
                if method == "centralised":
                    rows = run_centralised(settings, base, fleet, costs, evals, run_dir)
                    adapter = run_dir / "adapter"
                elif method == "fedavg":
                    rows = run_fedavg(settings, base, fleet, costs, evals, run_dir)
                    adapter = run_dir / "adapter"
                else:
                    rows, summary = run_split(settings, base, fleet, costs, method, alpha, wire, broker, run_dir)
                    adapter = Path(summary["adapter"])
                run_wall = time.perf_counter() - t0
                write_jsonl(run_dir / "rounds.jsonl", rows)
                final = final_evaluation(settings, base, adapter, task)
            except Exception as exc:  # one failed run must not lose the others: recorded, reported, skipped
                say(f"  FAILED: {type(exc).__name__}: {exc} (see {run_dir})")
                failed.append(
                    {"alpha": alpha, "method": method, "wire_dtype": wire, "error": f"{type(exc).__name__}: {exc}"}
                )
                continue
            summaries.append(summarise(settings, base, alpha, method, wire, rows, final, run_wall))
            (run_dir / "summary.json").write_text(json.dumps(summaries[-1]) + "\n")
            quality = ", ".join(f"{k} {final[k]}" for k in final if k not in ("final_ppl", "final_acc"))
            say(
                f"  done in {run_wall:.0f} s: final ppl {final['final_ppl']:.2f}, "
                f"simulated {rows[-1]['virtual_s']:.1f} s{', ' + quality if quality else ''}"
            )
    summaries += hindsight_summaries(settings, base, out, summaries, costs, task)
    write_jsonl(out / "summary.jsonl", summaries)
    write_jsonl(out / "failed.jsonl", failed)
    plot_study(settings, out, with_targets(out, summaries, settings.target_margin))
    meta["failed_runs"] = len(failed)
    # study_wall_s is this start's: the kept runs' time is not in it, and the report says so
    meta["runs"] = len(plan)
    meta["kept_runs"] = kept
    meta["study_wall_s"] = round(time.perf_counter() - started, 1)
    (out / "study.json").write_text(json.dumps(meta, indent=2, default=str))
    say(f"study finished in {meta['study_wall_s'] / 60:.1f} min; results in {out}")
    return meta


def summarise(
    settings: StudySettings,
    base: Path,
    alpha: float,
    method: str,
    wire: str,
    rows: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any],
    run_wall: float,
) -> dict[str, Any]:
    layers = num_layers(load_config(str(base)))
    trained = rows[1:]
    tokens = settings.rounds * settings.local_steps * settings.agents * settings.batch_size
    split = method in SPLIT_METHODS or is_hindsight(method)
    summary: dict[str, Any] = {
        "alpha": alpha,
        "method": method,
        "wire_dtype": wire if split else None,
        "rounds": f"runs/alpha-{alpha:g}/{method if wire == 'fp16' else f'{method}-{wire}'}/rounds.jsonl",
        "sequences": tokens,
        "virtual_s": rows[-1]["virtual_s"],
        "round_virtual_s": rows[-1]["virtual_s"] / max(len(trained), 1),
        "wall_s": round(run_wall, 1),
        "round_wall_s": round(rows[-1]["wall_s"] / max(len(trained), 1), 3),
        "final_round_ppl": rows[-1]["eval_ppl"],
        "bytes_up": rows[-1]["bytes_up"],
        "bytes_down": rows[-1]["bytes_down"],
        **final,
    }
    if split:
        ratios = [r["achieved_over_ideal"] for r in trained[1:] if r.get("achieved_over_ideal")]
        summary["achieved_over_ideal"] = round(sum(ratios) / len(ratios), 4) if ratios else None
        summary["retried_rounds"] = sum(1 for r in trained if r.get("attempt", 1) > 1)
        peak: dict[str, float] = {}
        for r in trained:
            for name, rss in (r.get("rss_mb") or {}).items():
                if rss is not None:
                    peak[name] = max(peak.get(name, 0.0), rss)
        summary["agent_rss_mb"] = {n: round(v, 1) for n, v in sorted(peak.items())}
        deepest = max(max(r["cuts"].values()) for r in trained)
        summary["device_memory_mb"] = memory_estimate_mb(settings, base, deepest, head=False)
        summary["final_cuts"] = trained[-1]["cuts"]
    elif method == "fedavg":
        summary["device_memory_mb"] = memory_estimate_mb(settings, base, layers, head=True)
    else:
        summary["device_memory_mb"] = 0.0  # the devices only hold their data
    return summary
