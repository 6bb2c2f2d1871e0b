"""The end of a round: adapter uploads checked as they arrive, collected until every agent still in the
round sent one (or its deadline passed), and screened before they are aggregated."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import torch

from splitft.coordinator.exchange import ENVELOPE_BYTES, StepExchange
from splitft.coordinator.membership import wait_briefly
from splitft.coordinator.roster import Agents, Participant, Refusals, Roster
from splitft.shared.errors import Refusal, WireError
from splitft.shared.job.config import JobConfig
from splitft.shared.wire.link import Received
from splitft.shared.wire.messages import parse_adapter

log = logging.getLogger(__name__)


class Uploads:
    """Collect and screen the agents' adapter uploads."""

    def __init__(
        self,
        job: JobConfig,
        authenticated: bool,
        agents: Agents,
        roster: Roster,
        refusals: Refusals,
        exchange: StepExchange,
    ) -> None:
        self.job = job
        self.authenticated = authenticated  # the job has a key: a message's sender is who it says
        self.agents = agents
        self.roster = roster
        self.refusals = refusals
        self.exchange = exchange
        self.wake = asyncio.Event()  # an upload arrived, an agent went offline, a repeat may need its answer

    @staticmethod
    def most_bytes(participant: Participant) -> int:
        """The most an upload of ``participant`` may decompress to: what it was sent, in fp32."""
        return ENVELOPE_BYTES + sum(4 * t.numel() + 256 for t in participant.sent.values())

    def arrived(self, received: Received) -> None:
        """Check an upload as it arrives: the first valid one of the current assignment is kept, nothing else."""
        env, name = received.envelope, received.envelope.sender
        participant = self.roster.current(env)
        if participant is None:
            self.refusals.count(Refusal.UNEXPECTED, name, f"an adapter upload of no current assignment ({env.corr})")
            return
        if participant.upload is not None:
            return  # a repeat (re-sent after a reconnect)
        try:
            upload = parse_adapter(env.body, participant.expect)
        except WireError as exc:
            self.refusals.count(exc.reason, name, exc.detail)
            # Authenticated, a NaN/Inf upload is the agent's own diverged update: refuse it and tell it.
            # Unauthenticated it may be a forgery: wait for the agent's real upload.
            if exc.reason == Refusal.NONFINITE and self.authenticated:
                self.roster.drop(participant, f"upload refused: {exc.detail}", event="refused")
                self.wake.set()
            return
        participant.bytes_up += received.size
        participant.timings = upload.timings
        participant.upload = upload.state
        self.wake.set()

    async def collect(self, participants: dict[str, Participant]) -> dict[str, dict[str, torch.Tensor]]:
        """Wait for every agent still in the round to upload (checked on arrival by :meth:`arrived`)."""
        deadline = time.monotonic() + self.job.upload_timeout_s
        while True:
            while not self.exchange.events.empty():  # activations repeated after a reconnect still get their answer
                self.exchange.answer_late(self.exchange.events.get_nowait())
            for name, participant in participants.items():
                if participant.dropped is None and participant.upload is None and self.agents.gone(name):
                    self.roster.drop(participant, "went offline before uploading", notify=False)
            remaining = deadline - time.monotonic()
            for participant in participants.values():
                if participant.dropped is None and participant.upload is None and remaining <= 0:
                    self.roster.drop(participant, f"no adapter upload within {self.job.upload_timeout_s:g} s")
            if all(p.dropped is not None or p.upload is not None for p in participants.values()):
                return {n: p.upload for n, p in participants.items() if p.dropped is None and p.upload is not None}
            await wait_briefly(self.wake, remaining)

    def screen(
        self, uploads: dict[str, dict[str, torch.Tensor]], participants: dict[str, Participant]
    ) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """Refuse updates far larger than the round's median (a diverged or poisoned device); weight the
        rest by the tokens the server counted for each agent, not by what the agent claims."""
        for name, state in uploads.items():
            p = participants[name]
            p.update_norm = math.sqrt(sum(float((state[k] - p.sent[k]).double().pow(2).sum()) for k in state))
        ratio = self.job.max_update_ratio
        norms = sorted(participants[n].update_norm for n in uploads)
        median = norms[len(norms) // 2] if norms else 0.0
        kept: list[tuple[float, dict[str, torch.Tensor]]] = []
        for name, state in uploads.items():
            p = participants[name]
            if p.dropped is not None:
                continue
            if ratio > 0 and len(uploads) >= 3 and median > 0 and p.update_norm > ratio * median:
                reason = f"upload refused: update norm {p.update_norm:.3g} > {ratio:g} x the median {median:.3g}"
                self.roster.drop(p, reason, event="refused")
                continue
            kept.append((float(p.tokens), state))
        return kept
