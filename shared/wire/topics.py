"""MQTT topic names: built and parsed here and nowhere else.

    splitft/v1/<job>/coordinator/status          retained; Last Will "offline"
    splitft/v1/<job>/round                        round control, coordinator -> all
    splitft/v1/<job>/metrics                      per-round metrics, coordinator -> all
    splitft/v1/<job>/agents/<agent>/status        retained; Last Will "offline"
    splitft/v1/<job>/agents/<agent>/join          agent -> coordinator (device profile)
    splitft/v1/<job>/agents/<agent>/assign        coordinator -> agent (cut, ranks, adapters, ...)
    splitft/v1/<job>/agents/<agent>/act           agent -> coordinator (cut-layer activations)
    splitft/v1/<job>/agents/<agent>/grad          coordinator -> agent (activation gradients)
    splitft/v1/<job>/agents/<agent>/tail_act      coordinator -> agent (U split: activations entering its tail)
    splitft/v1/<job>/agents/<agent>/tail_grad     agent -> coordinator (U split: the gradient at its tail)
    splitft/v1/<job>/agents/<agent>/adapter       agent -> coordinator (client-side LoRA weights)
    splitft/v1/<job>/agents/<agent>/notice        coordinator -> agent (dropped from a round, upload refused)

The version segment lets a v2 fleet share a broker with v1. Topics are routing only: every field
the protocol relies on is repeated inside the msgpack envelope (the embedded broker speaks MQTT
3.1.1, which has no message properties).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from splitft.shared.errors import ConfigError

ROOT = "splitft"
VERSION = "v1"


class Kind(StrEnum):
    """What a message is: its envelope's ``type``, and the last segment of its topic (``chunk``: a part of a
    larger message of its topic's kind). Declared here and nowhere else."""

    STATUS = "status"
    JOIN = "join"
    ASSIGN = "assign"
    ACT = "act"
    GRAD = "grad"
    TAIL_ACT = "tail_act"
    TAIL_GRAD = "tail_grad"
    ADAPTER = "adapter"
    NOTICE = "notice"
    ROUND = "round"
    METRICS = "metrics"
    CHUNK = "chunk"


KINDS = frozenset(Kind)
AGENT_KINDS = (
    Kind.STATUS, Kind.JOIN, Kind.ASSIGN, Kind.ACT, Kind.GRAD, Kind.TAIL_ACT, Kind.TAIL_GRAD, Kind.ADAPTER, Kind.NOTICE
)  # fmt: skip
#: who may publish what: the agent named in the topic on these ...
UPSTREAM_KINDS = frozenset({Kind.STATUS, Kind.JOIN, Kind.ACT, Kind.TAIL_GRAD, Kind.ADAPTER})
#: ... and the coordinator on everything else (assign, grad, notice and the job-wide topics)
COORDINATOR = "coordinator"
JOB_KINDS = (Kind.ROUND, Kind.METRICS)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Job and agent names: 1-64 of ``A-Z a-z 0-9 _ . -`` (no MQTT wildcards or separators)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{kind} name must be 1-64 characters of A-Z a-z 0-9 _ . -, got {value!r}")
    return value


@dataclass(frozen=True)
class Topic:
    """A parsed topic: ``agent`` is None for job-wide and coordinator topics."""

    job: str
    kind: str
    agent: str | None = None

    @property
    def publisher(self) -> str:
        """The only sender allowed on this topic."""
        return self.agent if self.agent is not None and self.kind in UPSTREAM_KINDS else COORDINATOR


@dataclass(frozen=True)
class Topics:
    """The topics of one job."""

    job: str

    def __post_init__(self) -> None:
        check_name("job", self.job)

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{VERSION}/{self.job}"

    def agent(self, agent: str, kind: str) -> str:
        if kind not in AGENT_KINDS:
            raise ValueError(f"unknown agent topic kind {kind!r}")
        return f"{self.prefix}/agents/{check_name('agent', agent)}/{kind}"

    def all_agents(self, kind: str) -> str:
        """Subscription filter for one kind of message from every agent."""
        if kind not in AGENT_KINDS:
            raise ValueError(f"unknown agent topic kind {kind!r}")
        return f"{self.prefix}/agents/+/{kind}"

    def coordinator_status(self) -> str:
        return f"{self.prefix}/coordinator/status"

    def job_topic(self, kind: str) -> str:
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job topic kind {kind!r}")
        return f"{self.prefix}/{kind}"

    def parse(self, topic: str) -> Topic | None:
        """The parts of a topic of this job, or None if it is not one of ours."""
        parts = topic.split("/")
        if parts[:3] != [ROOT, VERSION, self.job]:
            return None
        rest = parts[3:]
        if len(rest) == 1 and rest[0] in JOB_KINDS:
            return Topic(self.job, rest[0])
        if rest == ["coordinator", "status"]:
            return Topic(self.job, "coordinator_status")
        if len(rest) == 3 and rest[0] == "agents" and rest[2] in AGENT_KINDS and _NAME.fullmatch(rest[1]):
            return Topic(self.job, rest[2], rest[1])
        return None
