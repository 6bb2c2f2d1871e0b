"""Where each device is cut this round: the cut controller's decision from what the devices and the server were
measured to do, kept within what each device's memory holds."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

from splitft.coordinator.controller import (
    Controller,
    ControllerSettings,
    Decision,
    DeviceEstimate,
    makespan_s,
    split_blocks,
)
from splitft.coordinator.estimates import FleetEstimates
from splitft.coordinator.exchange import StepExchange
from splitft.coordinator.roster import Agents, Participant
from splitft.coordinator.server import ServerModel
from splitft.shared.job.config import JobConfig
from splitft.shared.model.memory import MemoryFigures

log = logging.getLogger(__name__)


class CutPlanner:
    """The controller and the fleet's estimates it decides from; :meth:`layout` gives a device's (cut, tail)."""

    def __init__(self, job: JobConfig, agents: Agents) -> None:
        self.job = job
        self.agents = agents
        self.controller: Controller | None = None  # set by :meth:`start`
        self.estimates: FleetEstimates | None = None
        self._cuts: dict[str, tuple[int, int]] = {}  # the controller's latest decision: (cut, tail) per agent

    def start(self, estimates: FleetEstimates, num_layers: int) -> None:
        self.estimates = estimates
        self.controller = Controller(self.settings(num_layers))

    async def decide(self, round_: int, first_round: int) -> Decision | None:
        """The controller's cuts for this round, once every online agent has been measured.

        The decision is computed on a thread of its own: with hundreds of devices it takes seconds, and the
        event loop must go on answering the broker's keep-alives meanwhile."""
        if self.controller is None or self.estimates is None:
            return None
        job = self.job
        planned = job.plan_first_round and job.policy in ("latency", "splitft")
        if round_ == first_round and not planned:
            return None  # the configured cuts first; decisions rest on this run's own measurements
        known = self._measured(self.agents.online())
        if not known:
            return None  # first round (or a new agent): the configured cuts, and measure
        decision = await asyncio.to_thread(self.controller.decide, known, self.estimates.server())
        if job.u_split:
            # The controller placed blocks per device; the split puts them at the bottom or the top.
            k_max = self._k_max(self.controller.settings.num_layers)
            self._cuts = {
                name: split_blocks(blocks, job.tail_of(name), job.c_min, job.k_min, k_max)
                for name, blocks in decision.cuts.items()
            }
        else:
            self._cuts = {name: (cut, 0) for name, cut in decision.cuts.items()}
        log.info(
            "cuts %s (%s): predicted step %.3f s (server %.3f s), ideal %.3f s",
            self._cuts, decision.reason, decision.makespan_s, decision.server_s, decision.ideal_s,
        )  # fmt: skip
        return decision

    def deadlines(self, decision: Decision | None, participants: Mapping[str, Participant]) -> list[float]:
        """Each step's deadline this round (StepExchange.deadline_s): from the decision's predicted step or, before
        the controller decides (the first round, configured cuts), from the devices' join measurements at
        their layouts, so that a device that joins and stays silent holds a round for seconds, not minutes."""
        predicted = decision.makespan_s if decision is not None else self.predict(participants)
        loads = [self.agents.known[n].profile.get("load_s") for n in participants]
        intake = max((float(s) for s in loads if isinstance(s, (int, float)) and math.isfinite(s)), default=0.0)
        return [StepExchange.deadline_s(self.job, predicted, step, intake) for step in range(self.job.local_steps)]

    def predict(self, participants: Mapping[str, Participant]) -> float | None:
        """The step time the estimates predict for ``participants`` at their layouts (None: a device unmeasured)."""
        known = self._measured(list(participants))
        if self.controller is None or self.estimates is None or not known:
            return None
        blocks = {name: float(p.cut + p.tail) for name, p in participants.items()}
        return makespan_s(known, self.estimates.server(), self.controller.settings.num_layers, blocks)

    def _measured(self, names: list[str]) -> list[DeviceEstimate]:
        """The estimates of ``names``, a device that has not reported yet from its join measurement; empty when
        any of them (or all: none given) has no estimate."""
        if self.estimates is None:
            return []
        tokens = self.job.batch_size * self.job.max_length
        for name in names:  # a device that joined since the last round has only its own measurement
            self.estimates.observe_join(name, self.agents.known[name].profile, tokens)
        devices = [self.estimates.device(name) for name in names]
        return [d for d in devices if d is not None] if names and None not in devices else []

    def layout(self, name: str) -> tuple[int, int]:
        """``name``'s (cut, tail) this round: the controller's, else the job's; within its memory."""
        job = self.job
        return self._within_memory(name, *self._cuts.get(name, (job.cut_of(name), job.tail_of(name))))

    def _within_memory(self, name: str, cut: int, tail: int) -> tuple[int, int]:
        """``cut`` and ``tail``, or where the device's memory figures say it cannot hold them, the deepest it can
        (never below ``c_min`` and ``k_min``: admission refused devices that cannot hold those)."""
        memory = MemoryFigures.from_profile(self.agents.known[name].profile)
        fits = memory.blocks_that_fit(head=self.job.u_split) if memory is not None else cut + tail
        if cut + tail <= fits:
            return cut, tail
        job = self.job
        fitted_tail = max(job.k_min, min(tail, fits - job.c_min)) if job.u_split else 0
        fitted = max(job.c_min, fits - fitted_tail), fitted_tail
        log.warning(
            "%s: cut %d, tail %d do not fit its memory (%d blocks do): cut %d, tail %d", name, cut, tail, fits, *fitted
        )
        return fitted

    def _k_max(self, total: int) -> int:
        return min(self.job.k_max if self.job.k_max is not None else total, total - 1 - self.job.c_min)

    def settings(self, total: int) -> ControllerSettings:
        """The controller plans the blocks each device runs: its cut, plus its tail in the U split."""
        job = self.job
        if not job.u_split:
            return ControllerSettings(
                policy=job.policy, num_layers=total, c_min=job.c_min, c_max=job.c_max, fixed_cut=job.cut,
                fixed_cuts=dict(job.cuts), gamma=job.gamma, hysteresis=job.hysteresis,
            )  # fmt: skip
        c_max = job.c_max if job.c_max is not None else total - 1
        names = {*job.cuts, *job.tails}
        return ControllerSettings(
            policy=job.policy, num_layers=total, c_min=job.c_min + job.k_min,
            c_max=min(c_max + self._k_max(total), total - 1), fixed_cut=job.cut + job.tail,
            fixed_cuts={n: job.cut_of(n) + job.tail_of(n) for n in names}, gamma=job.gamma,
            hysteresis=job.hysteresis,
        )  # fmt: skip

    def observe(self, live: list[Participant], server: ServerModel) -> None:
        """What the round measured: each device's step timings and score, the server's time per step."""
        if self.estimates is None:
            return
        for participant in live:
            if participant.accuracies:
                score: float | None = sum(participant.accuracies) / len(participant.accuracies)
            elif participant.losses:  # the U split: no accuracy on the server; the agent's reported loss ranks it
                score = -sum(participant.losses) / len(participant.losses)
            else:
                score = None
            profile = self.agents.known[participant.name].profile
            self.estimates.observe_device(participant.name, participant.timings, profile, score)
            for seconds in participant.server_times:
                self.estimates.observe_server(server.num_layers, participant.blocks, seconds)
