"""The audited table: what the privacy benchmark measured on each model, for ``splitft-coordinator run`` to say.

``scripts/bench_exact_attack.py --table tools/audit/audited.json`` records, per model fingerprint, the best
attacker's token and label recovery at each audited cut without a defense, and at its defense cut each
clip-and-noise setting's recovery and price (eval loss against none, frozen base);
``scripts/bench_trained_defenses.py --table`` adds the private-adapter settings and the noised settings
fine-tuned with the defense on (their price after the model adapted, preferred where both exist). :func:`describe` turns that into the line ``run`` prints
for a job's cut, split and defense: the audited figures, or "not audited".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitft.shared.errors import SplitFTError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.loading import model_fingerprint

#: the table that ships with the package
AUDITED = Path(__file__).with_name("audited.json")


def record_audit(path: Path, results: dict[str, Any]) -> None:
    """Add (or replace) one model's figures in the table at ``path``, from the benchmark's results (the other
    benchmarks' figures for it, private and trained, are kept)."""
    none = results["costs"][0]["eval_loss"]
    _update(path, results["fingerprint"], results["model"], {
        "model": results["model"],
        "date": results["date"],
        "exact_tokens": results["settings"]["exact_tokens"],
        "cuts": {
            str(r["cut"]): {"tokens": r["best"], "attacker": r["best_attacker"], "labels": r["exact_labels"]}
            for r in results["plain"]
        },
        "defense_cut": results["defense_cut"],
        "defenses": [
            {
                "name": r["defense"],
                "noise": r["noise_std"] and round(r["noise_std"] * results["hidden_size"] ** 0.5 / r["clip"], 6),
                **_figures(r, c["eval_loss"], none),
            }
            for r, c in zip(results["defended"], results["costs"][1:], strict=True)
        ],
        "tail_gradient_labels": {str(r["tail"]): r["recovery"] for r in results["labels"]},
    })  # fmt: skip


def record_private(path: Path, fingerprint: str, results: dict[str, Any]) -> None:
    """Add the private-adapter figures (without noise) of ``scripts/bench_trained_defenses.py`` to a model's entry."""
    known = results["rows"][0]["eval_loss"]
    _update(path, fingerprint, results["model"], {"private": {
        "cut": results["cut"],
        "date": results["date"],
        "settings": [
            {"distance": r["distance"], **_figures(r, r["eval_loss"], known)}
            for r in results["rows"]
            if not r["knows_adapters"] and not r.get("noise") and r.get("bottleneck") is None
        ],
    }})  # fmt: skip


def record_trained(path: Path, fingerprint: str, results: dict[str, Any]) -> None:
    """Add the noised settings of ``scripts/bench_trained_defenses.py`` (fine-tuned with the clip at the median
    public norm and the noise on, private adapters or not) to a model's entry."""
    none = next(r["eval_loss"] for r in results["rows"] if r["setting"] == "none")
    _update(path, fingerprint, results["model"], {"trained": {
        "cut": results["cut"],
        "date": results["date"],
        "settings": [
            {
                "name": r["setting"], "private": not r["knows_adapters"], "noise": r["noise"],
                "distance": r["distance"], **_figures(r, r["eval_loss"], none),
            }
            for r in results["rows"]
            if r["noise"] > 0 and r["bottleneck"] is None
        ],
    }})  # fmt: skip


def _figures(row: dict[str, Any], eval_loss: float, reference: float) -> dict[str, Any]:
    """A benchmark row's best attacker, its token and label recovery, and its eval loss against ``reference``."""
    return {
        "tokens": row["best"],
        "attacker": row["best_attacker"],
        "labels": row["exact_labels"],
        "eval_loss": eval_loss / reference - 1,
    }


def _update(path: Path, fingerprint: str, model: str, figures: dict[str, Any]) -> None:
    """Set ``figures`` in the model's entry of the table at ``path`` (made if missing), the rest of it kept."""
    table = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    table["models"].setdefault(fingerprint, {"model": model, "cuts": {}, "defenses": []}).update(figures)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def load_table(path: Path = AUDITED) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()).get("models", {}))
    except (OSError, ValueError):
        return {}


def describe(
    fingerprint: str,
    cuts: list[int],
    split: str,
    defense: DefenseSettings,
    table: dict[str, Any] | None = None,
    private: bool = False,
) -> str:
    """One line: the audited recovery and price for this model, the job's cuts, its split, its defense and whether
    its client adapters are private."""
    models = load_table() if table is None else table
    entry = models.get(fingerprint)
    if entry is None:
        return "privacy: not audited (this model is not in the audit's table; run splitft-coordinator audit)"
    model = entry["model"]
    trained = _trained(entry, defense, private)
    if trained is not None:
        return trained
    if private:
        return _describe_private(entry, defense)
    if defense.noise > 0 and defense.clip_quantile is not None:
        rows = [d for d in entry["defenses"] if d["noise"] == defense.noise]
        if not rows:
            return (
                f"privacy: noise {defense.noise:g} not audited on {model} (audited: "
                + ", ".join(d["name"] for d in entry["defenses"])
                + ")"
            )
        row = rows[0]
        head = f"privacy: {row['name']} at cut {entry['defense_cut']} on {model}: the best attacker ({row['attacker']})"
        return head + _reads_back(row, "frozen base")
    if defense.active or defense.nopeek > 0:
        return f"privacy: the defense {defense.describe()} is not audited on {model}"
    parts = []
    for cut in sorted(set(cuts)):
        row = entry["cuts"].get(str(cut))
        parts.append(
            f"cut {cut}: {row['tokens']:.0%} of tokens ({row['attacker']})" if row else f"cut {cut}: not audited"
        )
    text = f"privacy: no defense; on {model} the best attacker reads back " + ", ".join(parts)
    if split == "u":
        gradient = max(entry["tail_gradient_labels"].values(), default=None)
        if gradient is not None:
            text += f"; U split labels: {gradient:.0%} from the tail gradient, and the next inputs with the tokens"
    return text


def _trained(entry: dict[str, Any], defense: DefenseSettings, private: bool) -> str | None:
    """The line for a noised defense measured fine-tuned with it (the clip at the median), or None."""
    audited = entry.get("trained") or {}
    if defense.noise == 0 or defense.clip_quantile != 0.5 or defense.nopeek > 0:
        return None
    for row in audited.get("settings", []):
        if (row["private"], row["noise"], row["distance"]) == (private, defense.noise, defense.distance):
            head = (
                f"privacy: {'private adapters + ' if private else ''}{row['name'].removeprefix('private + ')} at cut "
                f"{audited['cut']} on {entry['model']}: the best attacker ({row['attacker']}"
                f"{', the client segment completed from the public base' if private else ''})"
            )
            return head + _reads_back(row, "fine-tuned with the noise")
    return None


def _describe_private(entry: dict[str, Any], defense: DefenseSettings) -> str:
    audited = entry.get("private") or {}
    rows = [r for r in audited.get("settings", []) if r["distance"] == defense.distance]
    if not rows or defense.active or defense.nopeek > 0:
        return f"privacy: private adapters with {defense.describe()} are not audited on {entry['model']}"
    row = rows[0]
    head = (
        f"privacy: private adapters, distance {defense.distance:g}, at cut {audited['cut']} on {entry['model']}: the "
        f"best attacker ({row['attacker']}, the client segment completed from the public base)"
    )
    return head + _reads_back(row, "fine-tuned")


def _reads_back(row: dict[str, Any], how: str) -> str:
    """The line's end: reads back X% of a device's tokens [and Y% of its labels], for Z eval loss (audited, how)."""
    labels = "" if row["labels"] is None else f" and {row['labels']:.0%} of its labels"
    price = f"{row['eval_loss']:+.1%} eval loss (audited, {how})"
    return f" reads back {row['tokens']:.0%} of a device's tokens{labels}, for {price}"


def job_privacy(job: JobConfig, cuts: Sequence[int] | None = None) -> str:
    """:func:`describe` for a job: its model, the cuts it starts with (``cuts``, default the job file's), its
    split and its defense."""
    cuts = sorted(set(cuts) if cuts is not None else {job.cut, *job.cuts.values()})
    try:
        fingerprint = model_fingerprint(job.model)
    except SplitFTError:
        return "privacy: not audited (the model could not be read to look it up)"
    text = describe(fingerprint, cuts, job.split, job.defense, private=job.private_adapters)
    if job.policy != "fixed":
        text += (
            f" (the cuts the job starts with; the controller may move them within {job.c_min}..{job.c_max or 'L-1'})"
        )
    return text
