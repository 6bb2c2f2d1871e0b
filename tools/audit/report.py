"""The audit's report files (see :mod:`splitft.tools.audit`): the tables as markdown, every number as JSON, and the
recovery plot."""

from __future__ import annotations

import json
from pathlib import Path

from splitft.tools.audit.measure import AuditReport, CutResult

SHORT = {"exact search": "exact", "exact search by direction": "exact, directions", "learned inverse": "inverse"}


def best_cell(row: CutResult) -> str:
    rate, attacker = row.best
    return f"{rate:.1%} ({SHORT[attacker]})"


def markdown(report: AuditReport) -> str:
    """The audit's tables: the best attacker's recovery per cut (one column per defense), each attacker's
    figures, and label leakage per tail."""
    names = list(dict.fromkeys(r.defense for r in report.inversion))
    cuts = sorted({r.cut for r in report.inversion})
    by = {(r.defense, r.cut): r for r in report.inversion}
    lines = [
        "Token recovery by the best attacker (which one in brackets):",
        "",
        "| cut | baseline | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for cut in cuts:
        base = next(r.baseline for r in report.inversion if r.cut == cut)
        cells = [best_cell(by[(n, cut)]) if (n, cut) in by else "-" for n in names]
        lines.append(f"| {cut} | {base:.1%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each attacker (the learned inverse on every held-out token, the exact search on the first ones; labels: "
        "the device's loss targets read off the exact search's next inputs):",
        "",
        "| cut | defense | learned inverse | exact search | tokens searched | labels from next inputs | search s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report.inversion:
        exact = "-" if r.exact is None else f"{r.exact:.1%}"
        label = "-" if r.exact_labels is None else f"{r.exact_labels:.1%}"
        lines.append(
            f"| {r.cut} | {r.defense} | {r.recovery:.1%} | {exact} | {r.exact_tokens} | {label} | {r.exact_seconds:.0f} |"
        )
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
    """The best attacker's recovery vs cut, one line per defense, the frequency baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r.defense for r in report.inversion):
        rows = sorted((r for r in report.inversion if r.defense == name), key=lambda r: r.cut)
        ax.plot([r.cut for r in rows], [r.best[0] for r in rows], marker="o", label=name)
    base = sorted({(r.cut, r.baseline) for r in report.inversion})
    ax.plot([c for c, _ in base], [b for _, b in base], "k--", label="frequency baseline")
    ax.set(xlabel="cut layer c", ylabel="token recovery, best attacker (held-out GSM8K)", ylim=(0, 1.02))
    ax.set_title(f"Inversion of the activations at the cut: {Path(report.model).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
