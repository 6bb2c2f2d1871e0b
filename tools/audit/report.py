"""The audit's report files (see :mod:`splitft.tools.audit`): the tables as markdown, every number as JSON, and the
recovery plot."""

from __future__ import annotations

import json
from pathlib import Path

from splitft.tools.audit.measure import AuditReport


def markdown(report: AuditReport) -> str:
    """The audit's tables: recovery per cut (one column per defense) and label leakage per tail."""
    names = list(dict.fromkeys(r.defense for r in report.inversion))
    cuts = sorted({r.cut for r in report.inversion})
    by = {(r.defense, r.cut): r for r in report.inversion}
    lines = [
        "| cut | baseline | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for cut in cuts:
        base = next(r.baseline for r in report.inversion if r.cut == cut)
        cells = [f"{by[(n, cut)].recovery:.1%}" if (n, cut) in by else "-" for n in names]
        lines.append(f"| {cut} | {base:.1%} | " + " | ".join(cells) + " |")
    if report.labels:
        lines += [
            "",
            "| device tail k | server sees block | labels from hidden + gradient | model's own guess (hidden alone) | baseline |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.tail} | {r.depth} | {r.recovery:.1%} | {r.hidden_only:.1%} | {r.baseline:.1%} |"
            for r in report.labels
        ]
    return "\n".join(lines)


def write_report(report: AuditReport, out: Path) -> dict[str, Path]:
    """``audit.md`` (the tables), ``audit.json`` (every number and setting), ``audit.png`` (recovery vs cut)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "audit.md", "json": out / "audit.json", "plot": out / "audit.png"}
    paths["table"].write_text(markdown(report) + "\n")
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    plot_recovery(report, paths["plot"])
    return paths


def plot_recovery(report: AuditReport, path: Path) -> None:
    """Recovery vs cut, one line per defense, the frequency baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r.defense for r in report.inversion):
        rows = sorted((r for r in report.inversion if r.defense == name), key=lambda r: r.cut)
        ax.plot([r.cut for r in rows], [r.recovery for r in rows], marker="o", label=name)
    base = sorted({(r.cut, r.baseline) for r in report.inversion})
    ax.plot([c for c, _ in base], [b for _, b in base], "k--", label="frequency baseline")
    ax.set(xlabel="cut layer c", ylabel="top-1 token recovery (held-out GSM8K)", ylim=(0, 1.02))
    ax.set_title(f"Inversion of the activations at the cut: {Path(report.model).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
