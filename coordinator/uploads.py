"""The end of a round: adapter uploads checked as they arrive, collected until every agent still in the
round sent one (or its deadline passed), and screened before they are aggregated.

No single message vetoes an agent. Without a job key, anyone who can publish on the broker can send an upload in
an agent's name (the round's ``corr`` is readable on the wire), so an upload that is refused (NaN or Inf, or an
update more than ``max_update_ratio`` times the round's median: ``outlier``) is counted and the agent's next
one awaited; later valid uploads are kept aside (a few per agent) in case the first was the forgery. The agent
is dropped for its uploads only when all of them were refused by the upload deadline. With a key, a message's
sender is who it says: a refused upload is the agent's own, and the agent is dropped from the round and told.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import torch

from splitft.coordinator.exchange import StepExchange
from splitft.coordinator.membership import wait_briefly
from splitft.coordinator.roster import Agents, Participant, Refusals, Roster
from splitft.shared.errors import Refusal, WireError
from splitft.shared.job.config import JobConfig
from splitft.shared.wire.inbound import ENVELOPE_BYTES
from splitft.shared.wire.link import Received
from splitft.shared.wire.messages import parse_adapter

log = logging.getLogger(__name__)

#: valid uploads kept aside per agent after its first, in a job without a key (each at most an upload's bound)
MAX_SPARES = 4


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
        adapters = sum(4 * t.numel() + 256 for t in participant.sent.values())
        return (
            ENVELOPE_BYTES + adapters + (1024 if participant.private else 0)
        )  # the private part sealed: its nonce, tag

    def arrived(self, received: Received) -> None:
        """Check an upload as it arrives: the first valid one of the current assignment is taken; without a key,
        a few later valid ones are kept aside (the first may have been forged)."""
        env, name = received.envelope, received.envelope.sender
        participant = self.roster.current(env)
        if participant is None:
            self.refusals.count(Refusal.UNEXPECTED, name, f"an adapter upload of no current assignment ({env.corr})")
            return
        if participant.upload is not None and (self.authenticated or len(participant.spares) >= MAX_SPARES):
            return  # a repeat (re-sent after a reconnect)
        try:
            upload = parse_adapter(env.body, participant.expect, sealed=participant.private > 0)
        except WireError as exc:
            self.refusals.count(exc.reason, name, exc.detail)
            # With a key, a NaN/Inf upload is the agent's own diverged update: refuse it and tell it.
            if exc.reason == Refusal.NONFINITE and self.authenticated:
                self._drop_refused(participant, exc.detail)
            elif participant.upload is None:
                participant.refused_upload = exc.detail  # the next one is awaited
            return
        if participant.upload is not None:
            participant.spares.append((upload.state, upload.timings, received.size, upload.sealed))
            return
        self._take(participant, upload.state, upload.timings, received.size, upload.sealed)

    def _refuse_taken(self, participant: Participant, detail: str) -> None:
        """The upload ``participant`` holds is an outlier: with a key, the agent is dropped and told; without, its
        next upload is awaited (a spare, if one came meanwhile)."""
        self.refusals.count(Refusal.OUTLIER, participant.name, detail)
        if self.authenticated:
            self._drop_refused(participant, detail)
            return
        participant.refused_upload = detail
        participant.upload = None
        if participant.spares:
            self._take(participant, *participant.spares.pop(0))

    def _drop_refused(self, participant: Participant, detail: str) -> None:
        """With a key, a refused upload is the agent's own: it leaves the round, told why."""
        self.roster.drop(participant, f"upload refused: {detail}", event="refused")
        self.wake.set()

    def _take(
        self,
        participant: Participant,
        state: dict[str, torch.Tensor],
        timings: dict[str, float],
        size: int,
        sealed: bytes | None,
    ) -> None:
        participant.bytes_up += size
        participant.timings = timings
        participant.upload = state
        participant.sealed = sealed
        self.wake.set()

    async def take(self, participants: dict[str, Participant]) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """The round's screened uploads, weighted: collected, screened, and collected again for the agents whose
        uploads were refused, until none is missing or the upload deadline passed."""
        deadline = time.monotonic() + self.job.upload_timeout_s
        while True:
            kept = self.screen(await self.collect(participants, deadline), participants)
            if all(p.dropped is not None or p.upload is not None for p in participants.values()):
                return kept

    async def collect(
        self, participants: dict[str, Participant], deadline: float
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Wait for every agent still in the round to upload (checked on arrival by :meth:`arrived`)."""
        while True:
            while not self.exchange.events.empty():  # activations repeated after a reconnect still get their answer
                self.exchange.answer_late(self.exchange.events.get_nowait())
            for name, participant in participants.items():
                if participant.dropped is None and participant.upload is None and self.agents.gone(name):
                    self.roster.drop(participant, "went offline before uploading", notify=False)
            remaining = deadline - time.monotonic()
            for participant in participants.values():
                if participant.dropped is None and participant.upload is None and remaining <= 0:
                    refused = participant.refused_upload
                    why = f"every upload it sent was refused (the last: {refused})" if refused else "no adapter upload"
                    self.roster.drop(participant, f"{why} within {self.job.upload_timeout_s:g} s")
            if all(p.dropped is not None or p.upload is not None for p in participants.values()):
                return {n: p.upload for n, p in participants.items() if p.dropped is None and p.upload is not None}
            await wait_briefly(self.wake, remaining)

    def screen(
        self, uploads: dict[str, dict[str, torch.Tensor]], participants: dict[str, Participant]
    ) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """Refuse updates far larger than the round's median (a diverged, poisoned or forged one); weight the
        rest by the tokens the server counted for each agent, not by what the agent claims. Without a key, a
        refused agent's spare uploads are tried in turn, against the same median."""
        norms = {name: self._norm(participants[name], state) for name, state in uploads.items()}
        ratio = self.job.max_update_ratio
        ranked = sorted(norms.values())
        median = ranked[len(ranked) // 2] if ranked else 0.0
        kept: list[tuple[float, dict[str, torch.Tensor]]] = []
        for name in uploads:
            p = participants[name]
            while p.dropped is None and p.upload is not None:
                p.update_norm = self._norm(p, p.upload)
                if not (ratio > 0 and len(uploads) >= 3 and median > 0 and p.update_norm > ratio * median):
                    kept.append((float(p.tokens), p.upload))
                    break
                self._refuse_taken(p, f"update norm {p.update_norm:.3g} > {ratio:g} x the median {median:.3g}")
        return kept

    @staticmethod
    def _norm(participant: Participant, state: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float((state[k] - participant.sent[k]).double().pow(2).sum()) for k in state))
