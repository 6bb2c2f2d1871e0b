"""One step of the round, on the coordinator: the path of a device's message from its arrival to the answer.

``act`` (activations at the cut) -> :meth:`StepExchange._serve_act`: the server runs its blocks; two-part: the
loss and the backward pass, and the gradient at the cut goes down (``grad``). U split: the activations
entering the device's tail go down (``tail_act``); its ``tail_grad`` -> :meth:`StepExchange._serve_tail_grad`
finishes the backward pass, and the gradient at the cut goes down. A repeated message is answered again
(:meth:`StepExchange._is_repeat`), never trained on twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import torch

from splitft.coordinator.controller import Decision
from splitft.coordinator.server import BatchItem, MiddleStep, StepResult
from splitft.coordinator.session import Offline, Participant, Session
from splitft.shared.errors import Refusal, WireError
from splitft.shared.wire.link import Received
from splitft.shared.wire.messages import Activations, grad_body, parse_act, parse_tail_grad, tail_act_body
from splitft.shared.wire.topics import Kind

log = logging.getLogger(__name__)


class StepExchange(Session):
    """Serve every agent's step: activations in, gradients out."""

    def _step_deadline_s(self, decision: Decision | None, step: int) -> float:
        """How long a step may take: the predicted step times ``deadline_factor``, within bounds.

        The first step of a round also covers taking the assignment in (a new cut builds a new segment).
        """
        job = self.job
        if decision is None or not math.isfinite(decision.makespan_s):
            return job.step_timeout_s
        deadline = max(job.deadline_factor * decision.makespan_s, job.min_step_timeout_s)
        if step == 0:
            deadline += job.min_step_timeout_s
        return min(deadline, job.step_timeout_s)

    def _is_repeat(self, item: Received, plans: dict[str, Participant], round_: int) -> bool:
        """A repeated message of a step already answered: answer it the same way again (re-sent, not
        recomputed), since the agent re-sends only when it did not get the answer. True if it was one.

        Activations are answered with the gradient (two-part) or the tail activations (U split); a U split's
        tail gradient with the gradient at the cut."""
        env = item.envelope
        plan = plans.get(env.sender)
        if plan is None or plan.dropped is not None or env.round != round_ or env.corr != plan.corr:
            return False
        kind = item.topic.kind
        if kind == "act" and self.job.u_split:
            answer, type_ = plan.last_tail, Kind.TAIL_ACT
        elif kind == "act" or kind == "tail_grad":
            answer, type_ = plan.last_grad, Kind.GRAD
        else:
            return False
        if answer is None or answer[0] != env.step:
            return False
        assert self._link is not None
        log.info("%s repeated its %s of step %d: re-sending the answer", plan.name, kind, env.step)
        topic = self.topics.agent(plan.name, type_)
        self._spawn(self._link.publish(topic, type_, answer[1], round_=round_, step=env.step, corr=plan.corr))
        return True

    async def _step(self, round_: int, step: int, plans: dict[str, Participant], timeout_s: float) -> None:
        """Serve one step of every agent still in the round."""
        assert self.server is not None and self._link is not None
        job = self.job
        pending = {n for n, p in plans.items() if p.dropped is None}
        # Activations that arrived early (an agent a step ahead of the others) go first.
        for key in [k for k in self._early if k[1] < step]:
            del self._early[key]
        ready = [item for n in sorted(pending) for item in self._early.pop((n, step), [])]
        ready.reverse()  # popped from the end: oldest first
        deadline = time.monotonic() + timeout_s
        # server_batching: the step's activations wait here until every agent still in it sent its own; in the
        # U split, so do the tail gradients (one forward and one backward pass for them all)
        batching = job.server_batching
        collected: dict[str, Activations] = {}
        while pending:
            for name in [n for n in pending if plans[n].dropped is not None or self._gone(n)]:
                self._drop(plans[name], "went offline", notify=False)  # (no change if dropped already)
                pending.discard(name)
            for name in [n for n in collected if n not in pending]:
                del collected[name]
            if collected and pending <= collected.keys():
                pending -= await self._serve_batch(collected, plans, step)
                collected.clear()
            if batching and pending and all(plans[n].tail_grad is not None for n in pending):
                await self._finish_middle_batch(sorted(pending), plans, step)
                pending.clear()
            if not pending:
                return
            if ready:
                item: Received | Offline = ready.pop()
            else:
                # Wake up at the deadline, or when an offline agent's grace ends.
                offline = [self.agents[n].offline_since for n in pending]
                ends = [since + job.offline_grace_s for since in offline if since is not None]
                wake = min([deadline, *ends])
                try:
                    async with asyncio.timeout(max(wake - time.monotonic(), 0.0)):
                        item = await self._events.get()
                except TimeoutError:
                    if time.monotonic() < deadline:
                        continue
                    if collected:  # those that sent theirs are served; the others are late
                        pending -= await self._serve_batch(collected, plans, step)
                    answered = sorted(n for n in pending if plans[n].tail_grad is not None)
                    if batching and answered:  # U split: those whose tail gradient came finish their step
                        await self._finish_middle_batch(answered, plans, step)
                        pending -= set(answered)
                    for name in pending:
                        self._drop(plans[name], f"no activations for step {step} within the {timeout_s:.1f} s deadline")
                    return
            if isinstance(item, Offline):
                continue  # the loop's top drops it once its grace is over
            env = item.envelope
            name = env.sender  # the link checked it is the agent named in the topic
            plan = plans.get(name)
            if self._is_repeat(item, plans, round_):
                continue
            if plan is None or plan.dropped is not None or env.round != round_ or env.corr != plan.corr:
                self._count_rejection(Refusal.UNEXPECTED, name, f"{item.topic.kind} of another assignment ({env.corr})")
                continue
            if env.step < step or (env.step == step and name not in pending):
                self._count_rejection(
                    Refusal.UNEXPECTED, name, f"a stale {item.topic.kind} (round {env.round} step {env.step})"
                )
                continue
            if env.step > step:
                early = self._early.setdefault((name, env.step), [])
                if item.topic.kind == "act" and env.step < job.local_steps and len(early) < 4:  # bounded
                    early.append(item)
                else:
                    detail = f"{item.topic.kind} of step {env.step}, beyond what is kept for later steps"
                    self._count_rejection(Refusal.UNEXPECTED, name, detail)
                continue
            if item.topic.kind == "tail_grad":
                done = await self._serve_tail_grad(item, plan, step)
            elif job.u_split and plan.middle is not None:
                self._count_rejection(
                    Refusal.UNEXPECTED, name, f"activations while step {step} waits for its tail gradient"
                )
                continue
            elif batching:
                act = self._parse_act(item, plan)
                if act is not None:
                    collected[name] = act  # served with the step's others, at the loop's top
                continue
            else:
                done = await self._serve_act(item, plan, step)
            if done:
                pending.discard(name)

    async def _serve_act(self, item: Received, plan: Participant, step: int) -> bool:
        """An agent's activations at its cut: the server's part of its step (the first half in the U split).

        True when the agent's step is done (two-part: its gradient was sent, or it was dropped)."""
        assert self.server is not None and self._link is not None
        server, job, name = self.server, self.job, plan.name
        act = self._parse_act(item, plan)
        if act is None:
            return False
        t0 = time.perf_counter()
        try:
            if job.u_split:
                middle = await self._compute(server.forward_middle, plan.cut, server.num_layers - plan.tail, act)
            else:
                result = await self._compute(server.train_on, plan.cut, act, name)
        except RuntimeError as exc:  # e.g. out of memory on this batch: lose the agent's round, not the job
            log.exception("server step for %s failed", name)
            self._drop(plan, f"the server could not process its batch ({exc})")
            return True
        plan.server_times.append(time.perf_counter() - t0)
        if job.u_split:
            plan.middle = (step, middle)
            body = tail_act_body(middle.top.detach(), job.wire_dtype)
            plan.last_tail = (step, body)
            plan.bytes_down += await self._link.publish(
                self.topics.agent(name, "tail_act"),
                Kind.TAIL_ACT,
                body,
                round_=self._round_now,
                step=step,
                corr=plan.corr,
            )
            return False
        await self._reply(plan, step, result)
        return True

    def _parse_act(self, item: Received, plan: Participant) -> Activations | None:
        """An agent's activations, checked against the job's shapes; None (counted) if they are not."""
        assert self.server is not None
        server, job = self.server, self.job
        try:
            act = parse_act(
                item.envelope.body, server.hidden_size, job.batch_size, job.max_length, server.vocab_size,
                with_labels=not job.u_split,
            )  # fmt: skip
        except WireError as exc:
            # Counted and ignored; the agent's real activations may still come before the deadline.
            self._count_rejection(exc.reason, plan.name, exc.detail)
            return None
        plan.started = True
        plan.bytes_up += item.size
        return act

    async def _reply(self, plan: Participant, step: int, result: StepResult) -> None:
        """Two-part: the gradient at the agent's cut goes down; its step's figures are kept."""
        await self._send_grad(plan, step, grad_body(result.grad, self.job.wire_dtype, result.loss, result.tokens))
        plan.tokens += result.tokens
        plan.losses.append(result.loss)
        plan.accuracies.append(result.accuracy)

    async def _serve_batch(
        self, collected: dict[str, Activations], plans: dict[str, Participant], step: int
    ) -> set[str]:
        """``server_batching``: the step's activations of these agents in merged passes, then every answer
        down: two-part, the gradient (:meth:`ServerModel.train_batch`); U split, the activations entering the
        tail (:meth:`ServerModel.forward_batch`; the step ends in :meth:`_finish_middle_batch`). The server's
        time is shared between the agents by their rows' tokens (what the controller's estimates expect per
        device batch). Returns the agents whose step is over (answered, or dropped)."""
        assert self.server is not None and self._link is not None
        server, job = self.server, self.job
        items = [
            BatchItem(name, plans[name].cut, act, server.num_layers - plans[name].tail if job.u_split else 0)
            for name, act in sorted(collected.items())
        ]
        t0 = time.perf_counter()
        try:
            if job.u_split:
                middles = await self._compute(server.forward_batch, items, job.server_max_batch_tokens)
            else:
                results = await self._compute(server.train_batch, items, job.server_max_batch_tokens)
        except RuntimeError as exc:  # e.g. out of memory: lose these agents' round, not the job
            log.exception("merged server step for %s failed", ", ".join(collected))
            for name in collected:
                self._drop(plans[name], f"the server could not process its batch ({exc})")
            return set(collected)
        elapsed = time.perf_counter() - t0
        total = sum(int(act.lengths.sum()) for act in collected.values()) or 1
        for name, act in sorted(collected.items()):
            plan = plans[name]
            plan.server_times.append(elapsed * int(act.lengths.sum()) / total)
            if not job.u_split:
                await self._reply(plan, step, results[name])
                continue
            middle = middles[name]
            plan.middle = (step, middle)
            body = tail_act_body(middle.top.detach(), job.wire_dtype)
            plan.last_tail = (step, body)
            plan.bytes_down += await self._link.publish(
                self.topics.agent(name, "tail_act"),
                Kind.TAIL_ACT,
                body,
                round_=self._round_now,
                step=step,
                corr=plan.corr,
            )
        return set() if job.u_split else set(collected)

    async def _finish_middle_batch(self, names: list[str], plans: dict[str, Participant], step: int) -> None:
        """U split, ``server_batching``: the tail gradients of these agents through the merged passes'
        backward (:meth:`ServerModel.backward_batch`), then every gradient at the cut down."""
        assert self.server is not None
        middles: dict[str, MiddleStep] = {}
        tail_grads: dict[str, torch.Tensor] = {}
        for name in names:  # (the loop gives only agents with both)
            held, tail = plans[name].middle, plans[name].tail_grad
            assert held is not None and tail is not None
            middles[name], tail_grads[name] = held[1], tail[0]
        t0 = time.perf_counter()
        try:
            grads = await self._compute(self.server.backward_batch, middles, tail_grads)
        except RuntimeError as exc:
            log.exception("merged server backward for %s failed", ", ".join(names))
            for name in names:
                self._drop(plans[name], f"the server could not process its batch ({exc})")
            return
        elapsed = time.perf_counter() - t0
        total = sum(middles[n].tokens for n in names) or 1
        for name in names:
            plan, middle = plans[name], middles[name]
            assert plan.tail_grad is not None
            loss = plan.tail_grad[1]
            plan.server_times[-1] += elapsed * middle.tokens / total
            plan.middle = plan.tail_grad = None
            await self._send_grad(plan, step, grad_body(grads[name], self.job.wire_dtype))
            plan.tokens += middle.tokens
            if loss is not None:
                plan.losses.append(loss)

    async def _serve_tail_grad(self, item: Received, plan: Participant, step: int) -> bool:
        """U split: the agent's gradient at its tail finishes the server's backward pass; the gradient at its
        cut goes down. True when the agent's step is done."""
        assert self.server is not None
        if plan.middle is None or plan.middle[0] != step:
            self._count_rejection(
                Refusal.UNEXPECTED, plan.name, f"a tail gradient, but no forward pass of step {step} waits for it"
            )
            return False
        middle = plan.middle[1]
        try:
            tail_grad, loss = parse_tail_grad(item.envelope.body, tuple(middle.top.shape))
        except WireError as exc:
            self._count_rejection(exc.reason, plan.name, exc.detail)
            return False
        if self.job.server_batching:  # kept until every agent's is in (the step loop's top)
            if plan.tail_grad is None:
                plan.bytes_up += item.size
                plan.tail_grad = (tail_grad, loss)
            return False
        plan.bytes_up += item.size
        t0 = time.perf_counter()
        try:
            grad = await self._compute(self.server.backward_middle, middle, tail_grad, plan.name)
        except RuntimeError as exc:
            log.exception("server backward for %s failed", plan.name)
            self._drop(plan, f"the server could not process its batch ({exc})")
            return True
        plan.server_times[-1] += time.perf_counter() - t0
        plan.middle = None
        await self._send_grad(plan, step, grad_body(grad, self.job.wire_dtype))
        plan.tokens += middle.tokens
        if loss is not None:
            plan.losses.append(loss)
        return True

    async def _send_grad(self, plan: Participant, step: int, body: dict[str, Any]) -> None:
        assert self._link is not None
        plan.last_grad = (step, body)
        plan.bytes_down += await self._link.publish(
            self.topics.agent(plan.name, "grad"), Kind.GRAD, body, round_=self._round_now, step=step, corr=plan.corr
        )
        now = time.monotonic()
        if plan.last_grad_at:
            plan.step_times.append(now - plan.last_grad_at)
        plan.last_grad_at = now
