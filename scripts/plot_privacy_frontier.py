#!/usr/bin/env python3
"""The privacy frontier: token recovery by the best attacker against the eval-loss cost, one curve per defense,
from the results of ``bench_exact_attack.py`` (clip + noise, frozen split) and ``bench_trained_defenses.py``
(clip + noise, the information bottleneck, private adapters with the distance term and the combination, each
fine-tuned with the model).

    python scripts/plot_privacy_frontier.py --exact benchmarks/privacy/exact-attack.json \\
        --trained benchmarks/privacy/trained-defenses.json --out benchmarks/privacy/frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exact", type=Path, required=True)
    parser.add_argument("--trained", type=Path, required=True, help="bench_trained_defenses.py's results")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    exact, trained = json.loads(args.exact.read_text()), json.loads(args.trained.read_text())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    none = exact["costs"][0]["eval_loss"]
    plain = next(r for r in exact["plain"] if r["cut"] == exact["defense_cut"])
    noise = [(0.0, plain["best"], "none")] + [
        (100 * (c["eval_loss"] / none - 1), r["best"], r["defense"].replace("clip + ", ""))
        for r, c in zip(exact["defended"], exact["costs"][1:], strict=True)
    ]
    curves = [(noise, f"clip + noise, frozen split (cut {exact['defense_cut']})", "o")]
    ref = next(r for r in trained["rows"] if r["setting"] == "none")
    start = [(0.0, ref["best"], "none")]
    for kind, label, marker in (
        ("noise", "clip + noise, fine-tuned with it", "^"),
        ("bottleneck", "information bottleneck (MID), fine-tuned", "D"),
        ("private", "private adapters (+ distance), fine-tuned", "s"),
        ("combined", "private + distance + clip + noise, fine-tuned", "*"),
    ):
        rows = [r for r in trained["rows"] if _kind(r) == kind]
        points = [(100 * (r["eval_loss"] / ref["eval_loss"] - 1), r["best"], _short(r["setting"])) for r in rows]
        if points:
            curves.append(((start if kind != "combined" else []) + points, f"{label} (cut {trained['cut']})", marker))
    for points, label, marker in curves:
        ax.plot([x for x, _, _ in points], [100 * y for _, y, _ in points], marker=marker, label=label)
        for x, y, name in points:
            ax.annotate(name, (x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(10, color="grey", ls=":")
    ax.axvline(5, color="grey", ls=":")
    ax.set_xscale("symlog", linthresh=10)
    ax.set(xlabel="eval loss vs no defense (%)", ylabel="tokens recovered by the best attacker (%)", ylim=(0, 105))
    ax.set_xlim(left=-1)
    ax.set_title(f"What each defense buys against the exact search: {exact['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


def _kind(row: dict[str, object]) -> str:
    if row["setting"] == "none":
        return "none"
    if row.get("bottleneck") is not None:
        return "bottleneck"
    if not row["knows_adapters"]:
        return "combined" if row.get("noise") else "private"
    return "noise"


def _short(setting: object) -> str:
    return str(setting).replace("private + ", "").replace("clip + ", "")


if __name__ == "__main__":
    main()
