"""Who takes part: the agents known to the coordinator and whether they are online (:class:`Agents`), the current
round's participants (:class:`Roster`: the one place that says whether a message belongs to a live assignment),
and the count of refused messages (:class:`Refusals`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from splitft.coordinator.progress import Event, Progress
from splitft.shared.errors import ROUTINE_REFUSALS, Refusal
from splitft.shared.member import Member
from splitft.shared.model.lora import block_of
from splitft.shared.wire.control import notice_body
from splitft.shared.wire.envelope import Envelope
from splitft.shared.wire.topics import Kind, Topics

log = logging.getLogger(__name__)


@dataclass
class AgentInfo:
    name: str
    profile: dict[str, Any]
    sid: str = ""  # the session (process) that joined last
    offline_since: float | None = None  # when its Last Will came (time.monotonic); None while online
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def online(self) -> bool:
        return self.offline_since is None


class Agents:
    """The agents this process knows, by name, and whether they are online."""

    def __init__(self, offline_grace_s: float) -> None:
        self.known: dict[str, AgentInfo] = {}
        self.offline_grace_s = offline_grace_s

    def get(self, name: str) -> AgentInfo | None:
        return self.known.get(name)

    def online(self) -> list[str]:
        return sorted(n for n, a in self.known.items() if a.online)

    def offline_since(self, name: str) -> float | None:
        info = self.known.get(name)
        return info.offline_since if info is not None else None

    def gone(self, name: str) -> bool:
        """Offline for longer than the grace a reconnecting agent gets."""
        since = self.offline_since(name)
        return since is not None and time.monotonic() - since >= self.offline_grace_s

    def went_offline(self, name: str) -> bool:
        """Its Last Will came; True if it was online until now."""
        info = self.known.get(name)
        if info is None or not info.online:
            return False
        info.offline_since = time.monotonic()
        return True


@dataclass
class Participant:
    """An agent's part in the current round, and its figures for the round's record."""

    name: str
    cut: int
    ranks: dict[int, int]  # LoRA rank of every block the agent holds
    corr: str  # this assignment's id; the agent's activations and upload repeat it
    sid: str  # the agent's session (process) when it was assigned
    sent: dict[str, torch.Tensor]  # the adapters it was sent
    assign_body: dict[str, Any] = field(default_factory=dict)
    tail: int = 0  # U split: the blocks at the top of the model it holds
    started: bool = False  # its first activations arrived
    update_norm: float = 0.0
    upload: dict[str, torch.Tensor] | None = None  # its adapter upload, once a valid one arrived
    # Without a job key, valid uploads that came after the first (one of them may be the agent's own, the
    # first a forgery), with their sizes, and why the last refused one was: see coordinator/uploads.py
    spares: list[tuple[dict[str, torch.Tensor], dict[str, float], int, bytes | None]] = field(default_factory=list)
    refused_upload: str | None = None
    private: int = 0  # private adapters: blocks 0..private-1 are uploaded sealed, not in clear
    sealed: bytes | None = None  # their sealed upload, with ``upload``
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    server_times: list[float] = field(default_factory=list)  # the server's compute for each of its steps
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # the agent's mean per-step timings

    @property
    def blocks(self) -> int:
        """Blocks the agent runs: its cut plus its tail."""
        return self.cut + self.tail

    @property
    def expect(self) -> dict[str, tuple[int, ...]]:
        """The adapter names and shapes it must upload in clear: those it was sent (the private blocks' never)."""
        return {n: tuple(t.shape) for n, t in self.sent.items() if not self.private or block_of(n) >= self.private}


class Refusals:
    """Messages refused after the link took them (a stale step, a bad body), counted by reason and reported."""

    def __init__(self, progress: Progress) -> None:
        self.counts: dict[str, int] = {}
        self._progress = progress

    def count(self, reason: Refusal, agent: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._progress(Event.REJECTED, {"reason": str(reason), "agent": agent})
        level = logging.INFO if reason in ROUTINE_REFUSALS else logging.WARNING
        log.log(level, "rejected a message from %s: %s (%s)", agent, reason, detail)


class Roster:
    """The current round's participants: their assignments, their drops, and the one check of whether a message
    belongs to a live assignment (:meth:`current`)."""

    def __init__(self, member: Member, topics: Topics) -> None:
        self.member = member
        self.topics = topics
        self.round = 0
        self.participants: dict[str, Participant] = {}

    def begin(self, round_: int, participants: dict[str, Participant]) -> None:
        self.round = round_
        self.participants = participants

    def end(self) -> None:
        self.participants = {}

    def live(self, name: str) -> Participant | None:
        """``name``'s participation in this round, unless it was dropped."""
        participant = self.participants.get(name)
        return participant if participant is not None and participant.dropped is None else None

    def current(self, env: Envelope) -> Participant | None:
        """The live participant whose assignment ``env`` answers (its round and ``corr``), or None."""
        participant = self.live(env.sender)
        if participant is None or env.round != self.round or env.corr != participant.corr:
            return None
        return participant

    async def assign(self, participant: Participant) -> None:
        """Send (or send again) an agent its assignment."""
        topic = self.topics.agent(participant.name, Kind.ASSIGN)
        participant.bytes_down += await self.member.connected_link().publish(
            topic, Kind.ASSIGN, participant.assign_body, round_=self.round, corr=participant.corr
        )

    def drop(self, participant: Participant, reason: str, *, notify: bool = True, event: str = "dropped") -> None:
        """Take an agent out of this round (its client-side update is not aggregated); tell it if it can hear."""
        if participant.dropped is not None:
            return
        participant.dropped = reason
        log.warning("round %d: dropped agent %s: %s", self.round, participant.name, reason)
        if notify and self.member.link is not None:
            topic = self.topics.agent(participant.name, Kind.NOTICE)
            body = notice_body(event, reason)
            self.member.spawn(
                self.member.link.publish(topic, Kind.NOTICE, body, round_=self.round, corr=participant.corr)
            )
