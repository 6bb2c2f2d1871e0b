"""The run's plot: eval perplexity against time, and each agent's cut layer per round (from metrics.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rounds' lines of a metrics.jsonl (a failing job's last line, which has no evaluation, left out)."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [record for record in lines if not record.get("failed")]


def plot_run(metrics_path: Path, out_png: Path, title: str = "SplitFT run") -> Path:
    """Write a two-panel PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics_path)
    fig, (ax_loss, ax_cut) = plt.subplots(1, 2, figsize=(11, 4))
    times = [r["time_s"] for r in records]
    ppl = [r.get("eval_ppl") or math.exp(r["eval_loss"]) for r in records]
    ax_loss.plot(times, ppl, marker="o")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("wall time (s)")
    ax_loss.set_ylabel("eval perplexity (log scale)")
    ax_loss.set_title("Perplexity on GSM8K test (a subset), after each round")
    if len(ppl) > 1 and ppl[-1] > 0:
        ax_loss.annotate(
            f"{ppl[0]:,.0f} \u2192 {ppl[-1]:,.0f} ({ppl[0] / ppl[-1]:.1f}x lower)",
            (times[-1], ppl[-1]), xytext=(-10, 25), textcoords="offset points", ha="right",
        )  # fmt: skip
    ax_loss.grid(alpha=0.3, which="both")
    rounds = [r for r in records if r.get("cuts")]
    agents = sorted({name for r in rounds for name in r["cuts"]})
    classes = {name: a.get("class") for r in rounds for name, a in r.get("agents", {}).items()}
    for i, name in enumerate(agents):
        xs = [r["round"] for r in rounds if name in r["cuts"]]
        ys = [r["cuts"][name] + 0.06 * (i - (len(agents) - 1) / 2) for r in rounds if name in r["cuts"]]
        device = classes.get(name)
        ax_cut.plot(xs, ys, marker="s", label=f"{name} ({device})" if device and device != "unknown" else name)
    deepest = max((c for r in rounds for c in r["cuts"].values()), default=1)
    ax_cut.set_ylim(0.5, deepest + 0.5)  # whole cuts; the lines are nudged apart so equal cuts stay visible
    ax_cut.set_yticks(range(1, deepest + 1))
    ax_cut.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_cut.set_xlabel("round")
    ax_cut.set_ylabel("cut layer (blocks on the device)")
    ax_cut.set_title("Cut layer per agent")
    if agents:
        ax_cut.legend(fontsize="small")
    ax_cut.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
