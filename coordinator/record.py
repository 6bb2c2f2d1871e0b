"""The record of the job: one metrics line per round (``metrics.jsonl``), built from the round's participants."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from splitft.coordinator.controller import Decision
from splitft.coordinator.roster import Agents, Participant
from splitft.shared.errors import ExitCode, SplitFTError, exit_code_for
from splitft.shared.model.loss import EvalResult


class MetricsFile:
    """``metrics.jsonl``: one line per round (round 0: the evaluation before training); a job that stops on an
    error ends it with a line that says so (:func:`failure_record`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate(self, after: int) -> None:
        """Drop lines of rounds after the checkpoint (written before a crash, redone now)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["round"] <= after]
        self.path.write_text("".join(line + "\n" for line in kept))

    def restart(self) -> None:
        """A fresh run starts a fresh file."""
        if self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(record)) + "\n")


def failure_record(
    *, round_: int, attempt: int, time_s: float, exc: BaseException, rejected: Counter[str], before: Counter[str]
) -> dict[str, Any]:
    """The last line of a job that stopped on an error (no evaluation fields: readers skip it as a round).
    ``rejected``: the messages refused this far, by reason, as in every line; ``before``: those of the line
    before, so that ``rejected_since`` counts the refusals since."""
    return {
        "round": round_,
        "attempt": attempt,
        "time_s": time_s,
        "failed": True,
        "reason": f"{type(exc).__name__}: {exc}" if not isinstance(exc, SplitFTError) else str(exc),
        "exit_code": int(exit_code_for(exc) if isinstance(exc, SplitFTError) else ExitCode.FAILED),
        "rejected": dict(rejected),
        "rejected_since": dict(rejected - before),
    }


def round_record(
    *,
    round_: int,
    attempt: int,
    time_s: float,
    round_time_s: float,
    result: EvalResult,
    participants: Mapping[str, Participant],
    agents: Agents,
    u_split: bool,
    workers: Mapping[str, int] | None,
    rejected: Counter[str],
    policy: str,
    decision: Decision | None,
) -> dict[str, Any]:
    """A round's metrics line. ``workers``: which coordinator worker served each agent (None: no workers);
    ``rejected``: the messages refused this far, by reason."""
    live = [p for p in participants.values() if p.dropped is None]
    record: dict[str, Any] = {
        "round": round_,
        "attempt": attempt,
        "time_s": round(time_s, 3),
        "round_time_s": round(round_time_s, 3),
        **eval_fields(result),
        # None in a U-split job whose agents do not report their loss
        "train_loss": (
            sum(sum(p.losses) for p in live) / sum(len(p.losses) for p in live) if any(p.losses for p in live) else None
        ),
        "train_tokens": sum(p.tokens for p in live),
        "cuts": {p.name: p.cut for p in participants.values()},
        **({"tails": {p.name: p.tail for p in participants.values()}} if u_split else {}),
        "agents": {
            p.name: {
                "class": agents.known[p.name].profile.get("class", "unknown"),
                "cut": p.cut,
                **({"tail": p.tail} if u_split else {}),
                "tokens": p.tokens,
                "step_time_s": sum(p.step_times) / max(len(p.step_times), 1),
                "server_s": sum(p.server_times) / max(len(p.server_times), 1),
                "bytes_up": p.bytes_up,
                "bytes_down": p.bytes_down,
                "update_norm": p.update_norm,
                "dropped": p.dropped,
                "timings": p.timings,
                **({"worker": workers.get(p.name, 0)} if workers is not None else {}),
            }
            for p in participants.values()
        },
        "bytes_up": sum(p.bytes_up for p in participants.values()),
        "bytes_down": sum(p.bytes_down for p in participants.values()),
        "rejected": dict(rejected),
        "coordinator_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
    }
    record["step_time_s"] = max((a["step_time_s"] for a in record["agents"].values() if not a["dropped"]), default=0)
    if decision is not None:
        record["controller"] = {
            "policy": policy,
            "reason": decision.reason,
            "kept": decision.kept,
            "predicted_step_s": decision.makespan_s,
            "predicted_server_s": decision.server_s,
            "predicted_device_s": decision.device_s,
            "ideal_step_s": decision.ideal_s,
            "achieved_over_ideal": record["step_time_s"] / decision.ideal_s if decision.ideal_s > 0 else None,
        }
    return record


def eval_fields(result: EvalResult) -> dict[str, float]:
    return {
        "eval_loss": round(result.loss, 6),
        "eval_ppl": round(result.perplexity, 4),
        "eval_acc": round(result.accuracy, 6),
        "eval_tokens": result.tokens,
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value
