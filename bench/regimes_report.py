"""The regimes study's report: the tables of a BENCHMARKS.md section, the price of the U split's privacy, the
controller before and after, and a plot per regime (the results are :func:`splitft.bench.regimes.run_regime`'s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def light(result: Mapping[str, Any]) -> dict[str, Any]:
    """A regime's result without the per-round rows of the fixed cuts that were not the best one."""
    keep = {"splitft", "latency", "oracle", result["best_fixed"]}
    return {**result, "runs": {p: rows for p, rows in result["runs"].items() if p in keep}}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def server_name(result: Mapping[str, Any]) -> str:
    """The regime's server as the scenario names it, and its rates: 'gpu-l4 (12.1,12.1 TFLOP/s)'."""
    name, rates = result["server"], result["server_tflops"]
    return f"{rates} TFLOP/s" if name == rates else f"{name} ({rates} TFLOP/s)"


def model_name(model: Mapping[str, Any]) -> str:
    """'tiny-llama (llama): 8.6M parameters, 12 blocks, hidden 128, vocab 50,257'."""
    return (
        f"{model['name']} ({model['type']}): {model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['layers']} blocks, hidden {model['hidden']}, vocab {model['vocab']:,}"
    )


def report(results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], folder: str = "benchmarks/regimes") -> str:
    """The section's tables; ``meta`` names the model, ``folder`` is where the plots are linked from."""
    lines = [
        f"Model: {model_name(meta['model'])}. Server rates in TFLOP/s, blocks and LM head.",
        "",
        "| regime | split | devices | server | best fixed (in hindsight) | splitft vs best fixed | splitft / oracle "
        "| best fixed / oracle | step prediction error (median / worst) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['split']} | {r['devices']} | {server_name(r)} | {r['best_fixed']} "
            f"({r['total_s'][r['best_fixed']]:.1f} s) | **{r['splitft_vs_best_fixed']:.2f}x** sooner "
            f"| {r['splitft_over_oracle']:.3f} | {r['best_fixed_over_oracle']:.3f} "
            f"| {_pct(r['step_error_median'])} / {_pct(r['step_error_worst'])} |"
        )
    for r in results:
        total = r["total_s"]
        lines += [
            "",
            f"#### {r['scenario']}, {r['split']} split: {r['devices']} devices at the start, "
            f"server {server_name(r)}, {r['rounds']} rounds",
            "",
            "| policy | simulated time of the run (s) | vs oracle |",
            "|---|---:|---:|",
        ]
        for policy in ("oracle", "splitft", "latency", r["best_fixed"]):
            label = f"best fixed: {policy}" if policy == r["best_fixed"] else policy
            lines.append(f"| {label} | {total[policy]:.2f} | {total[policy] / total['oracle']:.3f} |")
        fixed = ", ".join(f"{p.removeprefix('fixed-')}: {v:.1f}" for p, v in total.items() if p.startswith("fixed-"))
        lines += [
            "",
            f"Every fixed cut (s): {fixed}. Controller: regret against the oracle {r['regret_s']:+.2f} s"
            + (
                f" ({r['splitft_over_oracle_between_events']:.3f} of the oracle's time on the rounds without an event)"
                if r.get("splitft_over_oracle_between_events")
                else ""
            )
            + "; "
            f"predicted vs simulated step time {_pct(r['step_error_median'])} median, "
            f"{_pct(r['step_error_worst'])} worst (round time: {_pct(r['round_error_median'])} / "
            f"{_pct(r['round_error_worst'])}).",
        ]
        if r["resettle_rounds"]:
            lines += [
                "",
                "| from round | event | rounds until splitft is within 10% of the oracle |",
                "|---:|---|---:|",
            ]
            for e in r["resettle_rounds"]:
                settled = "never" if e["rounds_to_settle"] is None else str(e["rounds_to_settle"])
                lines.append(f"| {e['round']} | {e['events']} | {settled} |")
        lines += ["", f"![{r['scenario']}, {r['split']}]({folder}/{plot_name(r)})"]
    return "\n".join(lines)


def plot_name(result: Mapping[str, Any]) -> str:
    return f"{result['scenario']}-{result['split']}.png"


def privacy_price(results: Sequence[Mapping[str, Any]]) -> str:
    """The U split against the two-part split, regime by regime: the time the privacy costs."""
    by = {(r["scenario"], r["split"]): r for r in results}
    lines = [
        "| regime | two-part: splitft (s) | U: splitft (s) | U / two-part | two-part: oracle (s) | U: oracle (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (name, split), r in by.items():
        if split != "two-part" or (name, "u") not in by:
            continue
        u = by[name, "u"]
        t, tu = r["total_s"], u["total_s"]
        lines.append(
            f"| {name} | {t['splitft']:.2f} | {tu['splitft']:.2f} | {tu['splitft'] / t['splitft']:.2f}x "
            f"| {t['oracle']:.2f} | {tu['oracle']:.2f} |"
        )
    return "\n".join(lines)


def plot_regime(result: Mapping[str, Any], path: Path) -> Path:
    runs = result["runs"]
    fig = Figure(figsize=(9, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for policy, style in (("oracle", ":"), (result["best_fixed"], "--"), ("splitft", "-")):
        rows = runs[policy]
        label = f"best fixed ({policy})" if policy == result["best_fixed"] else policy
        top.plot([r["round"] for r in rows], [r["round_s"] for r in rows], style, marker="o", ms=3, label=label)
    top.set_ylabel("simulated round time (s)")
    top.set_yscale("log")
    top.legend(fontsize=8)
    names = sorted({n for r in runs["splitft"] for n in r["cuts"]})
    for name in names:
        points = [(r["round"], r["cuts"][name]) for r in runs["splitft"] if name in r["cuts"]]
        bottom.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1, alpha=0.7, label=name)
    bottom.set_ylabel("splitft: cut per device")
    bottom.set_xlabel("round")
    if len(names) <= 8:
        bottom.legend(fontsize=7, ncol=4)
    for ax in (top, bottom):
        for event in result["events"]:
            ax.axvline(event["round"] - 0.5, color="grey", ls="--", lw=0.8)
    for i, event in enumerate(result["events"]):
        top.annotate(event["event"], (event["round"] - 0.45, 0.97 - 0.06 * (i % 6)), xycoords=("data", "axes fraction"),
                     fontsize=6, va="top", color="dimgrey")  # fmt: skip
    top.set_title(
        f"{result['scenario']} ({result['split']} split): {result['devices']} devices, server {server_name(result)}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def before_after(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> str:
    """The controller before and after the regimes study's changes, regime by regime (same rates, same split)."""
    lines = [
        "| regime | split | before: vs best fixed | before: / oracle | after: vs best fixed | after: / oracle |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for b, a in zip(before, after, strict=True):
        lines.append(
            f"| {a['scenario']} | {a['split']} | {b['splitft_vs_best_fixed']:.2f}x | {b['splitft_over_oracle']:.3f} "
            f"| {a['splitft_vs_best_fixed']:.2f}x | {a['splitft_over_oracle']:.3f} |"
        )
    return "\n".join(lines)
