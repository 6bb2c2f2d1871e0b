"""Membership, on the coordinator: agents join (admitted or refused with the reason), go offline (their Last Will)
and come back; the coordinator's own status; waiting until enough agents joined."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from splitft.coordinator.progress import Event, Progress
from splitft.coordinator.roster import AgentInfo, Agents, Roster
from splitft.shared.errors import JobError
from splitft.shared.job.config import JobConfig
from splitft.shared.member import Member
from splitft.shared.model.memory import MemoryFigures, shortfall
from splitft.shared.wire.control import Join, notice_body
from splitft.shared.wire.topics import COORDINATOR, Kind, Topics

log = logging.getLogger(__name__)


class Membership:
    """Admission, joins and Last Wills. ``on_offline(name)`` runs when an agent's process is gone (its Last Will
    came, or another process of it joined during its round), for the parts that wait on it."""

    def __init__(
        self,
        job: JobConfig,
        fingerprint: str,
        member: Member,
        topics: Topics,
        agents: Agents,
        roster: Roster,
        progress: Progress,
        on_offline: Callable[[str], None],
    ) -> None:
        self.job = job
        self.fingerprint = fingerprint
        self.member = member
        self.topics = topics
        self.agents = agents
        self.roster = roster
        self.progress = progress
        self.on_offline = on_offline
        self._joined = asyncio.Event()
        self._restoring = False  # an announce is on its way (status_seen)
        self._restored = -1.0  # when the last one went

    # ------------------------------------------------------------------ the coordinator's status

    def status(self, state: str) -> tuple[str, str, dict[str, Any]]:
        # max_length, chat_template: so that a joining agent can say how many of its examples fit
        body = {
            "state": state,
            "role": COORDINATOR,
            "max_length": self.job.max_length,
            "chat_template": self.job.chat_template,
            "batch_size": self.job.batch_size,  # and what memory a step needs on it
            "lora_rank": max(self.job.lora.r, self.job.lora.r_cut),  # and how large an assignment may be
            "private_blocks": self.job.c_min if self.job.private_adapters else 0,  # and the sealed uploads in it
            # A new connection makes agents re-send what it may have missed; a status announced again on the same
            # one (restoring it over something else on the topic) does not.
            "connection": self.member.link.connects if self.member.link is not None else 0,
        }
        return self.topics.coordinator_status(), Kind.STATUS, body

    async def announce(self) -> None:
        # Retained: agents that start later, or reconnect, learn that the coordinator is up and (re)join.
        if self.member.link is not None:  # None during the first connection: run() announces right after
            await self.member.link.publish(*self.status("online"), retain=True)

    def status_seen(self, sid: str | None, detail: str) -> None:
        """A message came on the coordinator's own status topic: its own (``sid`` its link's), or another's that
        now stands retained in its place for whoever connects next (garbage, a forgery, the Last Will of a
        process of this job that is gone, ``sid`` None when the link refused it): announce again, at most once a
        second, so that agents starting later find a valid status."""
        link = self.member.link
        if link is None or sid == link.sid or self._restoring:
            return
        log.warning("another message stands on the coordinator's status topic (%s); announcing again", detail)
        self._restoring = True
        self.member.spawn(self._restore())

    async def _restore(self) -> None:
        try:
            await asyncio.sleep(max(self._restored + 1.0 - time.monotonic(), 0.0))
            self._restored = time.monotonic()
        finally:
            self._restoring = False
        await self.announce()

    # ------------------------------------------------------------------ joins and Last Wills

    def joined(self, name: str, sid: str, join: Join) -> None:
        refusal = self.refusal(join)
        if refusal is not None:
            cause, reason = refusal
            log.warning("agent %s not admitted: %s", name, reason)
            known = self.agents.get(name)
            if known is not None and known.sid in (sid, ""):
                self.offline(name)  # admitted before it could say (its first join came before our status)
            if self.member.link is not None:
                topic = self.topics.agent(name, Kind.NOTICE)
                body = notice_body("not_admitted", reason, cause)
                self.member.spawn(self.member.link.publish(topic, Kind.NOTICE, body))
            return
        info = self.agents.get(name)
        if info is None:
            self.agents.known[name] = info = AgentInfo(name, dict(join.profile))
            log.info("agent %s joined (%d samples)", name, join.data_samples)
        info.profile = dict(join.profile)  # the latest: a join before our status lacks the job-shaped figures
        info.offline_since = None
        info.sid = sid
        self._joined.set()
        self.progress(Event.AGENT, {"name": name, "online": True, "profile": info.profile})
        participant = self.roster.live(name)
        if participant is None:
            return
        if sid != participant.sid:
            # A new process: whatever the old one did in this round is gone with it.
            self.roster.drop(participant, "restarted during the round", notify=False)
            self.on_offline(name)
        elif not participant.started:
            # Reconnected before its first step: the assignment may have been lost with the connection.
            self.member.spawn(self.roster.assign(participant))

    def refusal(self, join: Join) -> tuple[str, str] | None:
        """Why an agent cannot take part (cause, reason), or None."""
        job = self.job
        if join.fingerprint != self.fingerprint:
            return "model", (
                f"its model {join.model!r} (fingerprint {join.fingerprint}) is not the job's model {job.model!r} "
                f"(fingerprint {self.fingerprint}): give --model a copy of the job's model"
            )
        if join.usable_samples == 0:
            return "data", (
                f"none of its {join.data_samples} examples fits the job's max_length of {job.max_length} tokens "
                "(an example needs its prompt and at least one response token): give it shorter prompts, or "
                "raise max_length"
            )
        memory = MemoryFigures.from_profile(join.profile)
        if memory is not None:
            blocks, where = job.c_min, f"cut {job.c_min}, the shallowest the job allows"
            if job.u_split:
                blocks, where = job.c_min + job.k_min, f"cut {job.c_min} and tail {job.k_min}, the least the job allows"
            reason = shortfall(memory, job.model, blocks, job.u_split, where)
            if reason is not None:
                return "memory", reason
        return None

    def offline(self, name: str) -> None:
        """Its Last Will came (or it was admitted by mistake)."""
        if self.agents.went_offline(name):
            log.warning("agent %s went offline", name)
            info = self.agents.known[name]
            self.progress(Event.AGENT, {"name": name, "online": False, "profile": info.profile})
            self.on_offline(name)

    # ------------------------------------------------------------------ admission

    async def admit(self, needed: int) -> None:
        """Wait for ``needed`` agents (the job's ``min_agents``), then a short window for more."""
        deadline = time.monotonic() + self.job.join_timeout_s
        while len(self.agents.online()) < needed:
            self.progress(Event.WAITING, {"online": self.agents.online(), "needed": needed})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobError(
                    f"only {len(self.agents.online())} of the {needed} agents needed joined "
                    f"within {self.job.join_timeout_s:g} s"
                )
            await wait_briefly(self._joined, remaining)
        await asyncio.sleep(self.job.join_window_s)
        self.progress(Event.ADMITTED, {"agents": self.agents.online()})


async def wait_briefly(event: asyncio.Event, remaining_s: float) -> None:
    """Wait for ``event`` (cleared first) at most ``remaining_s`` and at most 1 s, so the caller re-checks."""
    event.clear()
    try:
        async with asyncio.timeout(min(remaining_s, 1.0)):
            await event.wait()
    except TimeoutError:
        pass
