"""The round loop: decide the cuts, assign, run the steps, collect the uploads, aggregate, evaluate,
write the metrics line; a round that too few agents finish is rolled back and run again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import psutil

from splitft.coordinator.controller import ControllerSettings, Decision, split_blocks
from splitft.coordinator.server import device_ranks
from splitft.coordinator.session import Participant, eval_fields, jsonable
from splitft.coordinator.uploads import Uploads
from splitft.coordinator.workers import assign_ranks, figures, merge_figures, round_message, route_step_topics
from splitft.shared.errors import JobError, WorkerLost
from splitft.shared.model.memory import MemoryFigures
from splitft.shared.wire.codec import encode_state
from splitft.shared.wire.control import Assignment, assign_body
from splitft.shared.wire.topics import Kind

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # runs of one round that fall short of min_agents before the job gives up


class Rounds(Uploads):
    """Run rounds; the cut controller's decisions between them."""

    async def _run_round(self, round_: int, eval_batches: list[Any]) -> dict[str, Any]:
        """Run a round until at least ``min_agents`` agents finish it; roll back the attempts that fall short."""
        assert self.server is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            snapshot = await self._compute(self.server.snapshot)
            reason = "too_few_agents"
            try:
                record = await self._round(round_, attempt, eval_batches)
            except WorkerLost as exc:
                self._lose_workers(round_, exc)
                record, reason = None, "worker_lost"
            if record is not None:
                return record
            await self._compute(self.server.restore, snapshot)
            self.progress("round_retry", {"round": round_, "attempt": attempt, "reason": reason})
        raise JobError(
            f"round {round_}: fewer than min_agents={self.job.min_agents} agents finished it in {MAX_ATTEMPTS} attempts"
        )

    async def _round(self, round_: int, attempt: int, eval_batches: list[Any]) -> dict[str, Any] | None:
        assert self.server is not None and self._link is not None
        server, link, job = self.server, self._link, self.job
        if len(self._online()) < job.min_agents:
            await self._admit()
        started = time.monotonic()
        self._round_now = round_
        self._early.clear()
        decision = await self._decide()
        plans: dict[str, Participant] = {}
        self._plans = plans
        for name in self._online():
            cut, tail = self._within_memory(name, *self._cuts.get(name, (job.cut_of(name), job.tail_of(name))))
            ranks = device_ranks(server.num_layers, cut, tail, job.lora)
            state = await self._compute(server.client_state, ranks)
            corr = f"{link.sid}:{round_}:{attempt}"
            plan = Participant(name, cut, ranks, corr, self.agents[name].sid, state, tail=tail)
            assignment = Assignment(
                round=round_,
                model=job.model,
                fingerprint=self.fingerprint,
                cut=cut,
                ranks=ranks,
                lora=job.lora,
                adapter=encode_state(state, job.adapter_wire_dtype),
                local_steps=job.local_steps,
                batch_size=job.batch_size,
                max_length=job.max_length,
                optimizer=job.optimizer,
                wire_dtype=job.wire_dtype,
                adapter_wire_dtype=job.adapter_wire_dtype,
                step_timeout_s=job.step_timeout_s,
                seed=job.seed,
                attempt=attempt,
                corr=corr,
                split=job.split,
                tail=tail,
                report_loss=job.report_loss,
                defense=job.defense,
                chat_template=job.chat_template,
            )
            plan.assign_body = assign_body(assignment)
            plans[name] = plan
        mine = await self._share_round(round_, attempt, plans, decision)  # the agents this process serves
        for plan in plans.values():
            await self._publish_plan(plan)
        layout: dict[str, Any] = {"cuts": {n: p.cut for n, p in plans.items()}}
        if job.u_split:
            layout["tails"] = {n: p.tail for n, p in plans.items()}
        self.progress("round_start", {"round": round_, **layout})
        await link.publish(
            self.topics.job_topic("round"), Kind.ROUND, {"event": "start", "agents": sorted(plans)}, round_=round_
        )

        group = self.group
        for step in range(job.local_steps):
            if group is None and not any(p.dropped is None for p in plans.values()):
                break  # (with workers, every rank takes every step: their collectives must pair up)
            await self._step(round_, step, mine, self._step_deadline_s(decision, step))
            await self._compute(server.finish_step, group.reduce if group is not None else None)
            self.progress("step", {"round": round_, "step": step + 1, "of": job.local_steps})
        if group is not None:
            for served in (await self._compute(group.gather, figures({})))[1:]:
                merge_figures(plans, served)

        uploads = self._screen_uploads(await self._collect_uploads(round_, plans), plans)
        live = [p for p in plans.values() if p.dropped is None]
        if len(live) < job.min_agents:
            log.warning(
                "round %d (attempt %d): %d of the %d agents needed finished (%s); rolling the round back",
                round_, attempt, len(live), job.min_agents,
                "; ".join(f"{p.name}: {p.dropped}" for p in plans.values() if p.dropped) or "none dropped",
            )  # fmt: skip
            self._plans = {}
            return None
        await self._compute(server.aggregate, uploads)
        self._plans = {}
        result = await self._compute(server.evaluate, eval_batches)
        now = time.monotonic()
        train_tokens = sum(p.tokens for p in live)
        record: dict[str, Any] = {
            "round": round_,
            "attempt": attempt,
            "time_s": round(self._elapsed_before + now - self._started, 3),
            "round_time_s": round(now - started, 3),
            **eval_fields(result),
            # None in a U-split job whose agents do not report their loss
            "train_loss": (
                sum(sum(p.losses) for p in live) / sum(len(p.losses) for p in live)
                if any(p.losses for p in live)
                else None
            ),
            "train_tokens": train_tokens,
            "cuts": {p.name: p.cut for p in plans.values()},
            **({"tails": {p.name: p.tail for p in plans.values()}} if job.u_split else {}),
            "agents": {
                p.name: {
                    "class": self.agents[p.name].profile.get("class", "unknown"),
                    "cut": p.cut,
                    **({"tail": p.tail} if job.u_split else {}),
                    "tokens": p.tokens,
                    "step_time_s": sum(p.step_times) / max(len(p.step_times), 1),
                    "server_s": sum(p.server_times) / max(len(p.server_times), 1),
                    "bytes_up": p.bytes_up,
                    "bytes_down": p.bytes_down,
                    "update_norm": p.update_norm,
                    "dropped": p.dropped,
                    "timings": p.timings,
                    **({"worker": self._ranks.get(p.name, 0)} if self._route_steps else {}),
                }
                for p in plans.values()
            },
            "bytes_up": sum(p.bytes_up for p in plans.values()),
            "bytes_down": sum(p.bytes_down for p in plans.values()),
            "rejected": dict(Counter(link.rejected) + Counter(self.rejected_bodies)),  # the link's and the runtime's
            "coordinator_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        }
        record["step_time_s"] = max(
            (a["step_time_s"] for a in record["agents"].values() if not a["dropped"]), default=0
        )
        if decision is not None:
            record["controller"] = {
                "policy": job.policy,
                "reason": decision.reason,
                "kept": decision.kept,
                "predicted_step_s": decision.makespan_s,
                "predicted_server_s": decision.server_s,
                "predicted_device_s": decision.device_s,
                "ideal_step_s": decision.ideal_s,
                "achieved_over_ideal": record["step_time_s"] / decision.ideal_s if decision.ideal_s > 0 else None,
            }
        self._observe(live)
        self._write_metrics(record)
        await link.publish(self.topics.job_topic("metrics"), Kind.METRICS, jsonable(record), round_=round_)
        self.progress("round_end", record)
        return record

    # ------------------------------------------------------------------ several coordinator workers

    async def _share_round(
        self, round_: int, attempt: int, plans: dict[str, Participant], decision: Decision | None
    ) -> dict[str, Participant]:
        """With workers: deal the agents out to the ranks, send the round to the workers, and return the
        agents this process serves once every rank listens to its own (before any assignment goes out)."""
        if not self._route_steps:
            return plans  # one process from the start: the step topics are subscribed with a wildcard
        assert self._link is not None and self.server is not None
        group = self.group
        self._ranks = assign_ranks(sorted(plans), group.world if group is not None else 1, self._ranks)
        mine = {n: p for n, p in plans.items() if self._ranks[n] == 0}
        await route_step_topics(self._link, self.topics, mine)
        if group is not None:
            deadlines = [self._step_deadline_s(decision, step) for step in range(self.job.local_steps)]
            message = await self._compute(round_message, round_, attempt, plans, self._ranks, deadlines, self.server)
            await self._compute(group.broadcast, message)
            await self._compute(group.barrier)
        return mine

    def _lose_workers(self, round_: int, exc: WorkerLost) -> None:
        """A worker is gone: leave the group; the round is rolled back and run again on this process alone."""
        log.error("round %d: %s; the job goes on with every device on this process", round_, exc)
        self.progress("worker_lost", {"round": round_, "error": str(exc)})
        if self.group is not None:
            self.group.close()
        self.group = None
        self._plans = {}

    # ------------------------------------------------------------------ the cut controller

    async def _decide(self) -> Decision | None:
        """The controller's cuts for this round, once every online agent has been measured.

        The decision is computed on a thread of its own: with hundreds of devices it takes seconds, and the
        event loop must go on answering the broker's keep-alives meanwhile."""
        if self.controller is None or self.estimates is None:
            return None
        planned = self.job.plan_first_round and self.job.policy in ("latency", "splitft")
        if self._round_now == self._first_round and not planned:
            return None  # the configured cuts first; decisions rest on this run's own measurements
        for name in self._online():  # a device that joined since the last round has only its own measurement
            self.estimates.observe_join(name, self.agents[name].profile, self.job.batch_size * self.job.max_length)
        devices = [self.estimates.device(name) for name in self._online()]
        if not devices or any(d is None for d in devices):
            return None  # first round (or a new agent): the configured cuts, and measure
        known = [d for d in devices if d is not None]
        decision = await asyncio.to_thread(self.controller.decide, known, self.estimates.server())
        if self.job.u_split:
            # The controller placed blocks per device; the split puts them at the bottom or the top.
            job, k_max = self.job, self._k_max(self.controller.settings.num_layers)
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

    def _within_memory(self, name: str, cut: int, tail: int) -> tuple[int, int]:
        """``cut`` and ``tail``, or where the device's memory figures say it cannot hold them, the deepest it can
        (never below ``c_min`` and ``k_min``: admission refused devices that cannot hold those)."""
        memory = MemoryFigures.from_profile(self.agents[name].profile)
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

    def _controller_settings(self, total: int) -> ControllerSettings:
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

    def _observe(self, live: list[Participant]) -> None:
        if self.estimates is None or self.server is None:
            return
        for plan in live:
            if plan.accuracies:
                score: float | None = sum(plan.accuracies) / len(plan.accuracies)
            elif plan.losses:  # the U split: no accuracy on the server; the agent's reported loss ranks it
                score = -sum(plan.losses) / len(plan.losses)
            else:
                score = None
            self.estimates.observe_device(plan.name, plan.timings, self.agents[plan.name].profile, score)
            for seconds in plan.server_times:
                self.estimates.observe_server(self.server.num_layers, plan.blocks, seconds)
