"""The study's plots and its report (a BENCHMARKS.md section), and the time each run took to the target
perplexity."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from splitft.bench.study.settings import FLEET, METHODS, SPLIT_METHODS, WIRE_DTYPES, StudySettings, read_jsonl


def time_to(rows: Sequence[Mapping[str, Any]], target: float, key: str) -> float | None:
    """When (``key``) the eval perplexity first reached ``target``: log-linear between the evaluations
    of the round before and the first round at or below it; None if it never did."""
    previous = None
    for row in rows:
        if row["eval_ppl"] <= target:
            if previous is None:
                return float(row[key])
            high, low = math.log(previous["eval_ppl"]), math.log(row["eval_ppl"])
            fraction = (high - math.log(target)) / (high - low) if high > low else 1.0
            return float(previous[key] + fraction * (row[key] - previous[key]))
        previous = row
    return None


def with_targets(out: Path, summaries: Sequence[Mapping[str, Any]], margin: float) -> list[dict[str, Any]]:
    """The runs of every alpha with a centralised run, each with the target perplexity (centralised's final
    round x (1 + margin)) and the simulated and wall time it took to reach it."""
    done = []
    for s in summaries:
        reference = next((r for r in summaries if r["alpha"] == s["alpha"] and r["method"] == "centralised"), None)
        if reference is None:
            continue
        target = reference["final_round_ppl"] * (1 + margin)
        rows = read_jsonl(out / s["rounds"])
        done.append(
            {
                **s,
                "target_ppl": round(target, 3),
                "time_to_target_s": time_to(rows, target, "virtual_s"),
                "wall_to_target_s": time_to(rows, target, "wall_s"),
            }
        )
    return done


# --------------------------------------------------------------------------- plots and report


COLORS = {
    "centralised": "black",
    "fedavg": "tab:red",
    "fixed": "tab:orange",
    "paper": "tab:purple",
    "splitft": "tab:blue",
    "oracle": "tab:green",
}


def best_fixed(summaries: Sequence[Mapping[str, Any]], alpha: float) -> dict[str, Any] | None:
    """Of the single cuts replayed for ``alpha`` (``fixed-c``, with their time to target), the one that reached the
    target soonest (or, none reaching it, finished soonest): best fixed in hindsight, named ``best fixed (cut c)``."""
    runs = [s for s in summaries if s["alpha"] == alpha and s["method"].startswith("fixed-")]
    if not runs:
        return None

    def key(s: Mapping[str, Any]) -> tuple[float, float]:
        reached = s.get("time_to_target_s")
        return (math.inf if reached is None else reached, s["virtual_s"])

    best = min(runs, key=key)
    return {**best, "method": f"best fixed (cut {best['method'].removeprefix('fixed-')})"}


def table_runs(summaries: Sequence[Mapping[str, Any]], alpha: float) -> dict[str, dict[str, Any]]:
    """One alpha's runs for the tables, by method: the methods run, best fixed in hindsight and the oracle."""
    runs = {s["method"]: dict(s) for s in summaries if s["alpha"] == alpha and s["wire_dtype"] in (None, "fp16")}
    table = {m: runs[m] for m in METHODS if m in runs}
    best = best_fixed(summaries, alpha)
    if best is not None:
        table["best fixed"] = best
    if "oracle" in runs:
        table["oracle"] = runs["oracle"]
    return table


def quality(s: Mapping[str, Any]) -> str:
    """The task's score of a run's greedy answers: GSM8K correct, or BLEU / ROUGE-L; '-' for none."""
    if "bleu" in s:
        return f"{s['bleu']:.2f} / {s['rouge_l']:.2f}"
    if "gsm8k_correct" in s:
        return f"{s['gsm8k_correct']}/{s['gsm8k_problems']}"
    return "-"


def plot_study(settings: StudySettings, out: Path, summaries: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    main = [s for s in summaries if s["wire_dtype"] in (None, "fp16") and not s["method"].startswith("fixed-")]
    alphas = settings.alphas
    fig = Figure(figsize=(6 * len(alphas), 8))
    axes = fig.subplots(2, len(alphas), squeeze=False)
    for col, alpha in enumerate(alphas):
        for s in (s for s in main if s["alpha"] == alpha):
            rows = read_jsonl(out / s["rounds"])
            for row_index, key in enumerate(("virtual_s", "wall_s")):
                ax = axes[row_index][col]
                ax.plot([r[key] for r in rows], [r["eval_ppl"] for r in rows], marker="o", ms=3, label=s["method"],
                        color=COLORS[s["method"]])  # fmt: skip
        for row_index, label in enumerate(("simulated time on the fleet (s)", "wall time on this host (s)")):
            ax = axes[row_index][col]
            target = next(s["target_ppl"] for s in main if s["alpha"] == alpha)
            ax.axhline(target, color="grey", ls=":", lw=1)
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"eval perplexity ({settings.task} held out)")
            ax.set_title(f"length-Dirichlet alpha = {alpha:g}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study_ppl.png", dpi=110)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    rows_ = [s for s in main if s["alpha"] == settings.wire_alpha]
    xs = range(len(rows_))
    ax.bar([x - 0.2 for x in xs], [s["bytes_up"] / 2**20 for s in rows_], 0.4, label="up (devices to server)")
    ax.bar([x + 0.2 for x in xs], [s["bytes_down"] / 2**20 for s in rows_], 0.4, label="down")
    ax.set_xticks(list(xs), [s["method"] for s in rows_])
    ax.set_ylabel("MiB over the whole run")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(0, 30 * max([s["bytes_up"] / 2**20 for s in rows_] + [s["bytes_down"] / 2**20 for s in rows_] + [1]))
    ax.set_title(f"Bytes per method (alpha = {settings.wire_alpha:g}; centralised: its raw data once)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study_bytes.png", dpi=110)

    split = [s for s in main if s["method"] in SPLIT_METHODS]
    fig = Figure(figsize=(4 * len(SPLIT_METHODS), 3.2 * len(alphas)))
    axes = fig.subplots(len(alphas), len(SPLIT_METHODS), squeeze=False)
    for r, alpha in enumerate(alphas):
        for c, method in enumerate(SPLIT_METHODS):
            ax = axes[r][c]
            run = next((s for s in split if s["alpha"] == alpha and s["method"] == method), None)
            if run is None:
                continue
            rows = read_jsonl(out / run["rounds"])[1:]
            for i, (name, profile) in enumerate(zip(rows[0]["cuts"], FLEET, strict=False)):
                ax.plot([row["round"] for row in rows], [row["cuts"].get(name, 0) + i * 0.06 for row in rows],
                        marker="o", ms=3, label=f"{name} ({profile})")  # fmt: skip
            ax.set_title(f"{method}, alpha = {alpha:g}")
            ax.set_xlabel("round")
            ax.set_ylabel("cut layer (agents offset slightly)")
            deepest = max(max(row["cuts"].values()) for row in rows)
            ax.set_ylim(0.5, max(deepest, 3) + 0.7)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    with_data = [ax for ax in axes.flat if ax.has_data()]
    if with_data:
        with_data[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_cuts.png", dpi=110)


def _fmt_s(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.2f}"


def report(out: Path) -> str:
    """The study's section of BENCHMARKS.md, from its files."""
    meta = json.loads((out / "study.json").read_text())
    summaries = read_jsonl(out / "summary.jsonl")
    summaries = with_targets(out, summaries, meta["settings"]["target_margin"])
    failed_path = out / "failed.jsonl"
    failed = read_jsonl(failed_path) if failed_path.exists() else []
    st = meta["settings"]
    lines = [f"**Failed run**: alpha {f['alpha']:g}, {f['method']} ({f['wire_dtype']}): {f['error']}" for f in failed]
    score = {"gsm8k": "GSM8K correct", "e2e": "BLEU / ROUGE-L"}.get(st.get("task", "gsm8k"), "score")
    for alpha in st["alphas"]:
        ref = table_runs(summaries, alpha)
        if not ref:
            continue
        first = next(iter(ref.values()))
        lines += [
            f"**alpha = {alpha:g}** (target perplexity {first['target_ppl']:.2f} = centralised final x "
            f"{1 + st['target_margin']:g})",
            "",
            "| method | sim. round s | sim. time to target s | wall round s | wall to target s | final ppl | "
            f"next-token acc | {score} | MiB up | MiB down | device memory MiB: est. (agent RSS) | final cuts | "
            "achieved/ideal |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for s in ref.values():
            cuts = "/".join(str(c) for c in s.get("final_cuts", {}).values()) or "-"
            ratio = s.get("achieved_over_ideal")
            name = s["method"] + (" (replayed)" if s.get("replayed_from") else "")
            wall = "- | -" if s.get("replayed_from") else f"{s['round_wall_s']:.1f} | {_fmt_s(s['wall_to_target_s'])}"
            lines.append(
                f"| {name} | {s['round_virtual_s']:.3f} | {_fmt_s(s['time_to_target_s'])} | "
                f"{wall} | {s['final_ppl']:.2f} | "
                f"{s['final_acc']:.4f} | {quality(s)} | {s['bytes_up'] / 2**20:.2f} | "
                f"{s['bytes_down'] / 2**20:.2f} | {_memory(s)} | {cuts} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |"
            )
        lines.append("")
        lines += _ratios(ref, st)
        if "splitft" in ref:
            lines += _cut_sensitivity(out, ref["splitft"], st["fixed_cut"])
        lines.append("")
    wire = [s for s in summaries if s["method"] == "splitft" and s["alpha"] == st["wire_alpha"]]
    if wire:
        fp32 = next((s for s in wire if s["wire_dtype"] == "fp32"), None)
        lines += [
            f"**Wire dtype** (splitft, alpha = {st['wire_alpha']:g}): activation and gradient bytes per token of "
            "the padded batch, against fp32",
            "",
            "| wire | bytes/token up | bytes/token down | bytes vs fp32 | final ppl | ppl vs fp32 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for dtype in WIRE_DTYPES:
            run = next((s for s in wire if s["wire_dtype"] == dtype), None)
            if run is None:
                continue
            per_token = _bytes_per_token(out, run)
            base_bytes = _bytes_per_token(out, fp32) if fp32 else per_token
            lines.append(
                f"| {dtype} | {per_token[0]:.1f} | {per_token[1]:.1f} | "
                f"{_vs_fp32(base_bytes, per_token, fp32)} | {run['final_ppl']:.3f} | "
                f"{'-' if fp32 is None else format((run['final_ppl'] / fp32['final_ppl'] - 1) * 100, '+.2f') + '%'} |"
            )
    return "\n".join(lines)


def _vs_fp32(fp32_bytes: tuple[float, float], bytes_: tuple[float, float], fp32: Mapping[str, Any] | None) -> str:
    if fp32 is None:
        return "- (no fp32 run)"
    return f"{(fp32_bytes[0] + fp32_bytes[1]) / (bytes_[0] + bytes_[1]):.2f}x smaller"


def _memory(s: Mapping[str, Any]) -> str:
    """The estimate for the deepest device part, and the largest measured agent process (Python and torch too)."""
    rss = s.get("agent_rss_mb") or {}
    return f"{s['device_memory_mb']:.0f}" + (f" ({max(rss.values()):.0f})" if rss else "")


def _ratios(ref: Mapping[str, Mapping[str, Any]], st: Mapping[str, Any]) -> list[str]:
    def speedup(other: str, goal: str | None) -> str:
        if "splitft" not in ref or other not in ref:
            return ""
        a, b = ref["splitft"]["time_to_target_s"], ref[other]["time_to_target_s"]
        other = ref[other]["method"]
        if a is None:
            return f"splitft did not reach the target ({other}: {_fmt_s(b)} s)"
        if b is None:
            whole = ref[other]["virtual_s"]
            return (
                f"{other} did not reach the target within its whole budget ({whole:.1f} s), splitft did in {a:.2f} s: "
                f"more than {whole / a:.1f}x sooner" + (f" (goal {goal})" if goal else "")
            )
        if a == 0:
            return "splitft's starting point already meets the target"
        return f"splitft {b / a:.2f}x sooner than {other}" + (f" (goal {goal})" if goal else "")

    best = "best fixed" if "best fixed" in ref else None
    parts = [speedup("fixed", None), speedup(best, "at least 0.95x") if best else "", speedup("fedavg", "3x")]
    lines = [f"- Time to target (simulated): {'; '.join(p for p in parts if p)}."] if any(parts) else []
    oracle, ours = ref.get("oracle", {}).get("time_to_target_s"), ref.get("splitft", {}).get("time_to_target_s")
    if oracle and ours:
        line = f"- splitft reached the target in {ours / oracle:.3f} of the oracle's time (goal at most 1.10)"
        if ours < oracle:  # the oracle picks cuts for the fixed run's adapters: rank r at every block
            line += "; sooner, by its lower rank at the cut block (fewer adapter bytes a round, other learning)"
        lines.append(line + ".")
    if "splitft" in ref and "centralised" in ref:
        gap = (ref["splitft"]["final_ppl"] / ref["centralised"]["final_ppl"] - 1) * 100
        line = f"- Final perplexity: splitft {gap:+.2f}% against centralised LoRA (goal within 2%)"
        if "bleu" in ref["splitft"] and "bleu" in ref["centralised"]:
            line += f"; BLEU {ref['splitft']['bleu']:.2f} against {ref['centralised']['bleu']:.2f}"
        lines.append(line + ".")
    if ref.get("splitft", {}).get("achieved_over_ideal"):
        lines.append(
            f"- Achieved step time over the balanced ideal, splitft rounds 2+: {ref['splitft']['achieved_over_ideal']:.2f} "
            "(goal within 1.15)."
        )
    return lines


def _cut_sensitivity(out: Path, s: Mapping[str, Any], fixed: int) -> list[str]:
    """What any cut could do: the controller's step model at the run's batches, one cut for all vs. the run's."""
    rows = read_jsonl(out / s["rounds"])[2:]
    rows = [r for r in rows if "one_cut_step_s" in r]
    if not rows:
        return []

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    one = {c: mean([r["one_cut_step_s"][c] for r in rows]) for c in rows[0]["one_cut_step_s"]}
    ideal, chosen = mean([r["ideal_step_s"] for r in rows]), mean([r["model_step_s"] for r in rows])
    listed = ", ".join(f"{c}: {v * 1000:.0f}" for c, v in one.items())
    return [
        f"- Step time in the controller's model (ms, rounds 2+ of splitft's run): one cut for all {listed}; "
        f"splitft's cuts {chosen * 1000:.0f}; the balanced ideal {ideal * 1000:.0f}. So no cuts can make a step more "
        f"than {one[str(fixed)] / ideal:.2f}x faster than the fixed cut {fixed}."
    ]


def _bytes_per_token(out: Path, s: Mapping[str, Any]) -> tuple[float, float]:
    """Mean activation (up) and gradient (down) message bytes per token of the padded batch."""
    run = out / Path(s["rounds"]).parent
    up = down = tokens = 0.0
    for record in read_jsonl(run / "metrics.jsonl")[1:]:
        for agent in record["agents"].values():
            timings = agent.get("timings") or {}
            up += timings.get("bytes_up", 0.0)
            down += timings.get("bytes_down", 0.0)
            tokens += timings.get("tokens_padded", 0.0)
    return (up / tokens, down / tokens) if tokens else (math.nan, math.nan)


def publish(out: Path, folder: Path) -> Path:
    """Copy the light results (plots, summaries, per-round JSONL) next to the report, to be committed."""
    if folder.exists():
        shutil.rmtree(folder)
    patterns = ("*.png", "study.json", "summary.jsonl", "runs/*/*/rounds.jsonl", "runs/*/*/metrics.jsonl",
                "runs/*/*/summary.json", "runs/*/fixed/hindsight/oracle.jsonl")  # fmt: skip
    for pattern in patterns:
        for path in out.glob(pattern):
            target = folder / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def _duration(meta: Mapping[str, Any]) -> str:
    """How long the study took; a resumed study's time is its last start's, which the kept runs are not in."""
    minutes = f"{meta.get('study_wall_s', 0) / 60:.1f} minutes"
    kept = int(meta.get("kept_runs", 0))
    if not kept:
        return f"{minutes} in all"
    runs = int(meta.get("runs", kept))
    were, their = ("was", "its") if kept == 1 else ("were", "their")
    return f"{minutes} for {runs - kept} of its {runs} runs ({kept} {were} kept from an earlier start; {their} time is not in it)"


def _model_line(meta: Mapping[str, Any]) -> str:
    facts = meta["base_facts"]
    if "tokens" in facts:  # the project's pretrained tiny base
        return (
            f"Base: `splitft.tools.pretrain`'s {facts['family']} family, {facts['parameters']:,} parameters, pretrained "
            f"on {facts['tokens']:,} tokens of WikiText-2 and E2E (WikiText-2 validation perplexity "
            f"{facts['valid_ppl']:.0f})."
        )
    return (
        f"Model: `{facts['model']}` ({facts['family']}, {facts['parameters'] / 1e6:.1f}M parameters from its config: "
        f"{facts['layers']} blocks of width {facts['hidden']}, vocabulary {facts['vocab']:,})."
    )


def _server_line(meta: Mapping[str, Any]) -> str:
    rates = meta["server_tflops"]
    if "server" not in meta:  # the first tiny studies: this host's calibrated speed x a factor
        return (
            f"Server: this host x {meta['settings']['server_speedup']:g} ({rates['blocks']:.2f} TFLOP/s on blocks; "
            "calibrated on the host that ran it, so another host replays it otherwise)."
        )
    return (
        f"Server: `{meta['server']}` ({rates['blocks']:.2f} TFLOP/s on blocks, {rates['head']:.2f} on the head; named, "
        "not measured: the controller plans with it too, so cuts and simulated times do not depend on this host)."
    )


TASK_TEXT = {
    "gsm8k": "GSM8K (train problems on the devices; per-round eval: the first {eval} test problems; final: {final} "
    "problems, greedy answers on {gen})",
    "wikitext": "WikiText-2 paragraphs (validation split on the devices; eval: the first {eval} test paragraphs per "
    "round, {final} at the end)",
    "e2e": "E2E NLG (validation pairs on the devices; eval: the first {eval} test meaning representations per round, "
    "{final} at the end; BLEU (sacrebleu) and ROUGE-L (rouge-score) of greedy descriptions of {gen} test MRs "
    "against all their references)",
}


def section(meta: Mapping[str, Any], text: str, out: Path) -> str:
    st = meta["settings"]
    task = TASK_TEXT[st.get("task", "gsm8k")].format(
        eval=st["eval_samples"], final=st["final_eval_samples"], gen=st["gen_samples"]
    )
    return (
        f"## Benchmark study ({st['variant']}, {st.get('task', 'gsm8k')}, {meta['base_facts'].get('model', 'tiny base')}"
        f"{', U split' if st.get('split') == 'u' else ''})"
        f"\n\n`{meta['command']}` on {meta['host']} ({meta['threads']} torch threads), {meta['date'][:10]}; "
        f"{_duration(meta)}. Raw results (JSONL per run): `{out}/`.\n\n"
        f"{_model_line(meta)} Task: {task}. "
        f"Fleet: {', '.join(meta['fleet'])} (virtual emulation). Each method: {st['rounds']} rounds x "
        f"{st['local_steps']} local steps x {len(meta['fleet'])} devices x {st['batch_size']} sequences of at most "
        f"{st['max_length']} tokens; AdamW lr {st['lr']}, LoRA r {st['r']} (splitft r_cut {st['r_cut']}); fixed cut "
        f"{st['fixed_cut']}; {st.get('split', 'two-part')} split. {_server_line(meta)}\n\n"
        "Time is read on two clocks. *Simulated* (sim.): every round replayed event by event "
        "(`splitft.bench.clock`) on the devices' profiles (compute: FLOPs over sustained throughput; link: "
        "the bytes the run really sent over the profiled bandwidth, plus RTT) against the server above. "
        "*Wall*: this host, where the coordinator, the "
        "broker and five agent processes share the cores and the agents compute at host speed (they report their "
        "profiles' times without waiting for them), so it shows the system's own overhead, not the fleet's; "
        "centralised and fedavg run in one process, without broker or messages. *Best fixed* and *oracle* are the "
        "fixed run replayed on the simulated clock at every single cut (the soonest to target, chosen in hindsight) "
        "and at each round's fastest cuts (the split is exact and the fixed run's rank uniform, so they learn what "
        "it learned). The target is centralised LoRA's "
        f"last per-round perplexity x {1 + st['target_margin']:g}; the time to reach it is interpolated "
        "log-linearly between rounds. Device memory: an estimate for the deepest device part (fp32 weights, LoRA "
        "with AdamW, saved activations), and in parentheses the largest agent process measured (RSS, with Python, "
        "torch and the tokenizer). "
        "Achieved/ideal: the step time of the round's cuts over the least step time of any fractional cuts, both "
        "in the controller's model at the round's mean batch shape (rounds 2 on).\n\n"
        f"![perplexity against time]({out}/study_ppl.png)\n![bytes]({out}/study_bytes.png)\n"
        f"![cuts]({out}/study_cuts.png)\n\n{text}\n"
    )
