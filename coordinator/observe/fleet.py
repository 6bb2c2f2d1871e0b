"""What the dashboard shows, kept from the coordinator's progress events: the fleet, the rounds, the
controller's last decision and the refusals. Plain data, no I/O; :meth:`FleetView.snapshot` is what the
page receives (JSON), whole, each time something changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from splitft.coordinator.progress import Event
from splitft.shared.job.config import JobConfig

#: The parts of a device's step, from its reported mean timings and the server's time for its batch:
#: the device's compute, its encoding (and decoding of what came back), its upload, the server's
#: compute, and the rest of its wait for the gradient (the download, queueing at the server and broker).
STEP_PARTS = ("compute", "codec", "upload", "server", "network")


def step_parts(timings: dict[str, float], server_s: float) -> dict[str, float]:
    """A device's mean step split into :data:`STEP_PARTS` (seconds)."""
    compute = timings.get("forward_s", 0.0) + timings.get("backward_s", 0.0) + timings.get("tail_s", 0.0)
    wait = timings.get("wait_s", 0.0)
    return {
        "compute": compute,
        "codec": timings.get("encode_s", 0.0) + timings.get("decode_s", 0.0),
        "upload": timings.get("upload_s", 0.0),
        "server": server_s,
        "network": max(wait - server_s, 0.0),
    }


@dataclass
class AgentRow:
    name: str
    device_class: str = "unknown"
    online: bool = True
    memory_mb: float | None = None  # what its profile says it can use
    cut: int | None = None
    tail: int | None = None
    rss_mb: float | None = None  # its process's memory, as it reported with its last round
    peak_rss_mb: float | None = None  # the most its process has held, likewise
    tokens: int = 0  # trained on, all rounds
    rounds: int = 0  # rounds it finished
    step_s: float | None = None  # its last round's mean step time
    parts: dict[str, float] = field(default_factory=dict)
    rejected: int = 0  # its messages refused (by the runtime or the link)
    dropped: str | None = None  # why it was dropped from its last round

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name, "class": self.device_class, "online": self.online, "memory_mb": self.memory_mb,
            "cut": self.cut, "tail": self.tail, "rss_mb": self.rss_mb, "peak_rss_mb": self.peak_rss_mb, "tokens": self.tokens, "rounds": self.rounds,
            "step_s": self.step_s, "parts": self.parts, "rejected": self.rejected, "dropped": self.dropped,
        }  # fmt: skip


class FleetView:
    """The job's state as the dashboard draws it, updated by :meth:`update` with each progress event."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.status = "starting"  # starting, waiting, running, done, failed
        self.round = 0
        self.step = 0
        self.started = time.time()
        self.agents: dict[str, AgentRow] = {}
        self.rounds: list[dict[str, Any]] = []  # one entry per evaluation (round 0 first)
        self.controller: dict[str, Any] | None = None
        self.rejected: dict[str, int] = {}
        self.error: str | None = None
        self.needed = job.min_agents  # as the coordinator waits for them (`local` sets it to its agent count)
        self.version = 0  # bumped by every change: the server pushes a snapshot when it moves

    def update(self, event: Event, data: dict[str, Any]) -> None:
        handler = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(data)
            self.version += 1

    def _agent(self, name: str) -> AgentRow:
        row = self.agents.get(name)
        if row is None:
            self.agents[name] = row = AgentRow(name)
        return row

    def _on_waiting(self, data: dict[str, Any]) -> None:
        self.status = "waiting"
        self.needed = int(data["needed"])

    def _on_agent(self, data: dict[str, Any]) -> None:
        row, profile = self._agent(data["name"]), data.get("profile") or {}
        row.online = bool(data["online"])
        row.device_class = str(profile.get("class", row.device_class))
        memory = profile.get("memory_usable_mb", profile.get("usable_mb", profile.get("memory_available_mb")))
        row.memory_mb = float(memory) if isinstance(memory, (int, float)) else row.memory_mb

    def _on_rejected(self, data: dict[str, Any]) -> None:
        reason = str(data["reason"])
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        name = data.get("agent") or _agent_of(data.get("topic", ""))
        if name in self.agents:
            self.agents[name].rejected += 1

    def _on_baseline(self, data: dict[str, Any]) -> None:
        self.rounds = [_round_point(data)]

    def _on_round_start(self, data: dict[str, Any]) -> None:
        self.status, self.round, self.step = "running", int(data["round"]), 0
        tails = data.get("tails") or {}
        for name, cut in data["cuts"].items():
            row = self._agent(name)
            row.cut, row.tail, row.dropped = int(cut), tails.get(name), None

    def _on_step(self, data: dict[str, Any]) -> None:
        self.step = int(data["step"])

    def _on_round_retry(self, data: dict[str, Any]) -> None:
        self.step = 0

    def _on_round_end(self, record: dict[str, Any]) -> None:
        self.rounds = [r for r in self.rounds if r["round"] < record["round"]] + [_round_point(record)]
        for name, a in record["agents"].items():
            row = self._agent(name)
            row.dropped = a["dropped"]
            row.tokens += int(a["tokens"])
            if a["dropped"] is None:
                row.rounds += 1
            timings = a.get("timings") or {}
            if timings:
                row.parts = step_parts(timings, float(a["server_s"]))
                row.step_s = float(timings.get("step_s", a["step_time_s"]))
                row.rss_mb = timings.get("rss_mb", row.rss_mb)
                row.peak_rss_mb = timings.get("peak_rss_mb", row.peak_rss_mb)
        self.controller = record.get("controller")
        if self.controller is not None:
            self.controller = {**self.controller, "round": record["round"], "step_s": record["step_time_s"]}

    def _on_done(self, data: dict[str, Any]) -> None:
        self.status = "done"

    def _on_failed(self, data: dict[str, Any]) -> None:
        self.status, self.error = "failed", str(data.get("error", ""))

    def snapshot(self) -> dict[str, Any]:
        job = self.job
        return {
            "job": {
                "name": job.job, "model": job.model, "rounds": job.rounds, "local_steps": job.local_steps,
                "split": job.split, "policy": job.policy, "min_agents": self.needed,
            },
            "status": self.status, "round": self.round, "step": self.step, "error": self.error,
            "elapsed_s": round(time.time() - self.started, 1),
            "agents": [self.agents[n].json() for n in sorted(self.agents)],
            "rounds": self.rounds, "controller": self.controller, "rejected": self.rejected, "parts": STEP_PARTS,
            "version": self.version,
        }  # fmt: skip


def _round_point(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("round", "time_s", "eval_loss", "eval_ppl", "eval_acc", "train_loss", "bytes_up", "bytes_down",
            "round_time_s", "step_time_s", "cuts", "tails")  # fmt: skip
    return {k: record[k] for k in keys if k in record}


def _agent_of(topic: str) -> str | None:
    """The agent a topic belongs to (``.../agents/<name>/<kind>``), if it names one."""
    parts = topic.split("/")
    return parts[-2] if len(parts) >= 3 and parts[-3] == "agents" else None
