"""One step of the round, on the coordinator: a device's message from its arrival to the answer, in one path.

``act`` (activations at the cut) arrives -> :meth:`StepExchange.queue` (bounded per agent) -> :meth:`StepExchange.step`
checks it belongs to a live assignment and this step (:meth:`Roster.current`), parses it, and serves the step's
activations in merged passes (:meth:`StepExchange._serve`): one arrival at once as a pass of one, or with
``server_batching`` every agent's together once all are in. Two-part: the server runs its blocks, the loss and
the backward pass, and the gradient at the cut goes down (``grad``). U split: the activations entering the
device's tail go down (``tail_act``); its ``tail_grad`` comes back and finishes the backward pass
(:meth:`StepExchange._finish`), and the gradient at the cut goes down. A repeated message is answered again
(:meth:`StepExchange.answer_again`), never trained on twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from splitft.coordinator.roster import Agents, Participant, Refusals, Roster
from splitft.coordinator.server import BatchItem, MiddleStep, ServerModel, StepResult
from splitft.shared.errors import Refusal, WireError
from splitft.shared.job.config import JobConfig
from splitft.shared.member import Member
from splitft.shared.wire.inbound import step_message_bytes
from splitft.shared.wire.link import Received
from splitft.shared.wire.messages import Activations, grad_body, parse_act, parse_tail_grad, tail_act_body
from splitft.shared.wire.queues import ByteQueue
from splitft.shared.wire.topics import Kind, Topic, Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: activations kept for a later step of the round (an agent ahead of the others), per agent and step
EARLY_PER_STEP = 4


@dataclass(frozen=True)
class Offline:
    """An agent's process is gone (an event for the step loop)."""

    name: str


@dataclass
class _Exchange:
    """An agent's step in flight and the answers already sent (to answer a repeat without recomputing)."""

    last_grad: tuple[int, dict[str, Any]] | None = None  # (step, body) of the last gradient sent
    last_tail: tuple[int, dict[str, Any]] | None = None  # U split: (step, body) of the last tail activations
    last_grad_at: float = 0.0
    middle: tuple[int, MiddleStep] | None = None  # U split: (step, the server's forward) awaiting its tail gradient
    tail_grad: tuple[torch.Tensor, float | None] | None = None  # U split: arrived, awaiting its backward pass


class StepExchange:
    """Serve every agent's step: activations in, gradients out."""

    def __init__(
        self, job: JobConfig, member: Member, topics: Topics, agents: Agents, roster: Roster, refusals: Refusals
    ) -> None:
        self.job = job
        self.member = member
        self.topics = topics
        self.agents = agents
        self.roster = roster
        self.refusals = refusals
        self.server: ServerModel | None = None  # set by :meth:`start`
        # Messages for the step loop, bounded per agent (set by :meth:`start`: a few steps' activations).
        self.events: ByteQueue[Received | Offline] = ByteQueue(1 << 30, 1 << 62)
        self._early: dict[tuple[str, int], list[Received]] = {}
        self._state: dict[str, _Exchange] = {}

    def start(self, server: ServerModel) -> None:
        """Serve with ``server``; what waits per agent: four activation messages (a step ahead, repeats)."""
        self.server = server
        self.events.per_sender_bytes = 4 * self.act_bytes()

    def begin_round(self) -> None:
        self._early.clear()
        self._state.clear()

    # ------------------------------------------------------------------ arrivals

    def act_bytes(self) -> int:
        """The most an activation message may decompress to: (B, T, C) fp32 activations, int32 labels."""
        assert self.server is not None
        return step_message_bytes(self.job.batch_size, self.job.max_length, self.server.hidden_size)

    def expect(self, topic: Topic) -> int | None:
        """The most a step message on ``topic`` may decompress to now: only an agent with a live assignment sends
        them, at most the size the job's shapes give; None: nothing is expected there."""
        if topic.kind not in (Kind.ACT, Kind.TAIL_GRAD) or self.server is None:
            return None
        return self.act_bytes() if self.roster.live(topic.agent or "") is not None else None

    def queue(self, received: Received) -> None:
        """Hand an activation or tail gradient to the step loop, within the agent's bound."""
        name = received.envelope.sender
        if not self.events.offer(name, received, max(received.decoded, 1)):
            detail = f"{self.events.held(name)} bytes of its messages wait for the step loop"
            self.refusals.count(Refusal.OVERLOADED, name, detail)

    def went_offline(self, name: str) -> None:
        self.events.offer(name, Offline(name), 0)

    # ------------------------------------------------------------------ one step

    @staticmethod
    def deadline_s(job: JobConfig, predicted_s: float | None, step: int, intake_s: float = 0.0) -> float:
        """How long a step may take: the predicted step (``predicted_s``) times ``deadline_factor``, within bounds;
        ``step_timeout_s`` when nothing predicts it.

        The first step of a round also covers taking the assignment in (a new cut builds a new segment): at least
        ``min_step_timeout_s`` more, or ``deadline_factor`` times ``intake_s``, the longest any device took to
        build a segment when it joined."""
        if predicted_s is None or not math.isfinite(predicted_s):
            return job.step_timeout_s
        deadline = max(job.deadline_factor * predicted_s, job.min_step_timeout_s)
        if step == 0:
            deadline += max(job.min_step_timeout_s, job.deadline_factor * intake_s)
        return min(deadline, job.step_timeout_s)

    async def step(self, step: int, served: dict[str, Participant], timeout_s: float) -> None:
        """Serve one step of every agent in ``served`` still in the round."""
        job, batching = self.job, self.job.server_batching
        pending = {n for n, p in served.items() if p.dropped is None}
        # Activations that arrived early (an agent a step ahead of the others) go first, oldest first.
        for key in [k for k in self._early if k[1] < step]:
            del self._early[key]
        ready = [item for n in sorted(pending) for item in self._early.pop((n, step), [])]
        ready.reverse()
        deadline = time.monotonic() + timeout_s
        arrived: dict[str, Activations] = {}  # parsed activations waiting for their merged pass
        while True:
            for name in [n for n in pending if served[n].dropped is not None or self.agents.gone(n)]:
                self.roster.drop(served[name], "went offline", notify=False)  # (no change if dropped already)
                pending.discard(name)
            await self._serve_ready(pending, arrived, served, step, wait=batching)
            if not pending:
                return
            if ready:
                item: Received | Offline = ready.pop()
            else:
                # Wake up at the deadline, or when an offline agent's grace ends.
                offline = [self.agents.offline_since(n) for n in pending]
                wake = min([deadline, *(since + job.offline_grace_s for since in offline if since is not None)])
                try:
                    async with asyncio.timeout(max(wake - time.monotonic(), 0.0)):
                        item = await self.events.get()
                except TimeoutError:
                    if time.monotonic() < deadline:
                        continue
                    # The deadline: those whose messages are in are served; the others are dropped as late.
                    await self._serve_ready(pending, arrived, served, step, wait=False)
                    for name in pending:
                        detail = f"no activations for step {step} within the {timeout_s:.1f} s deadline"
                        self.roster.drop(served[name], detail)
                    return
            if isinstance(item, Offline):
                continue  # the loop's top drops it once its grace is over
            self._take(item, step, pending, served, arrived)

    def _take(
        self,
        item: Received,
        step: int,
        pending: set[str],
        served: dict[str, Participant],
        arrived: dict[str, Activations],
    ) -> None:
        """Check one message against the step and keep what it brings for the loop's top."""
        env, kind = item.envelope, item.topic.kind
        name = env.sender  # the link checked it is the agent named in the topic
        participant = self.roster.current(env)
        if participant is None or name not in served:
            self.refusals.count(Refusal.UNEXPECTED, name, f"{kind} of another assignment ({env.corr})")
            return
        if self.answer_again(item, participant):
            return
        if env.step < step or (env.step == step and name not in pending):
            self.refusals.count(Refusal.UNEXPECTED, name, f"a stale {kind} (round {env.round} step {env.step})")
            return
        if env.step > step:
            early = self._early.setdefault((name, env.step), [])
            if kind == Kind.ACT and env.step < self.job.local_steps and len(early) < EARLY_PER_STEP:
                early.append(item)
            else:
                detail = f"{kind} of step {env.step}, beyond what is kept for later steps"
                self.refusals.count(Refusal.UNEXPECTED, name, detail)
            return
        state = self._of(name)
        if kind == Kind.TAIL_GRAD:
            self._take_tail_grad(item, participant, step)
        elif state.middle is not None:
            self.refusals.count(Refusal.UNEXPECTED, name, f"activations while step {step} waits for its tail gradient")
        else:
            act = self._parse_act(item, participant)
            if act is not None:
                arrived[name] = act

    async def _serve_ready(
        self,
        pending: set[str],
        arrived: dict[str, Activations],
        served: dict[str, Participant],
        step: int,
        *,
        wait: bool,
    ) -> None:
        """Serve what is in: the activations in ``arrived``, then the U split's tail gradients; with ``wait``
        (``server_batching`` before the deadline) only once every pending agent's are in. The agents whose step
        is over leave ``pending``; served activations leave ``arrived``."""
        for name in [n for n in arrived if n not in pending]:
            del arrived[name]
        if arrived and (not wait or pending <= arrived.keys()):
            pending -= await self._serve(dict(arrived), served, step)
            arrived.clear()
        if not self.job.u_split:
            return
        tails = sorted(n for n in pending if self._of(n).tail_grad is not None)
        if tails and (not wait or len(tails) == len(pending)):
            await self._finish(tails, served, step)
            pending -= set(tails)

    def answer_late(self, item: Received | Offline) -> None:
        """After the round's last step: a repeated message still gets its answer; anything else is refused."""
        if not isinstance(item, Received):
            return
        participant = self.roster.current(item.envelope)
        if participant is None or not self.answer_again(item, participant):
            detail = f"{item.topic.kind} of step {item.envelope.step} after the round's last step"
            self.refusals.count(Refusal.UNEXPECTED, item.envelope.sender, detail)

    def answer_again(self, item: Received, participant: Participant) -> bool:
        """A repeated message of a step already answered: answer it the same way again (re-sent, not
        recomputed), since the agent re-sends only when it did not get the answer. True if it was one.

        Activations are answered with the gradient (two-part) or the tail activations (U split); a U split's
        tail gradient with the gradient at the cut."""
        env, kind, state = item.envelope, item.topic.kind, self._of(participant.name)
        if kind == Kind.ACT and self.job.u_split:
            answer, type_ = state.last_tail, Kind.TAIL_ACT
        elif kind in (Kind.ACT, Kind.TAIL_GRAD):
            answer, type_ = state.last_grad, Kind.GRAD
        else:
            return False
        if answer is None or answer[0] != env.step:
            return False
        log.info("%s repeated its %s of step %d: re-sending the answer", participant.name, kind, env.step)
        link, topic = self.member.connected_link(), self.topics.agent(participant.name, type_)
        self.member.spawn(
            link.publish(topic, type_, answer[1], round_=self.roster.round, step=env.step, corr=participant.corr)
        )
        return True

    # ------------------------------------------------------------------ what arrives

    def _of(self, name: str) -> _Exchange:
        return self._state.setdefault(name, _Exchange())

    def _parse_act(self, item: Received, participant: Participant) -> Activations | None:
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
            self.refusals.count(exc.reason, participant.name, exc.detail)
            return None
        participant.started = True
        participant.bytes_up += item.size
        return act

    def _take_tail_grad(self, item: Received, participant: Participant, step: int) -> None:
        """U split: the agent's gradient at its tail, kept for the backward pass of its step."""
        state = self._of(participant.name)
        if state.middle is None or state.middle[0] != step:
            detail = f"a tail gradient, but no forward pass of step {step} waits for it"
            self.refusals.count(Refusal.UNEXPECTED, participant.name, detail)
            return
        try:
            tail_grad, loss = parse_tail_grad(item.envelope.body, tuple(state.middle[1].top.shape))
        except WireError as exc:
            self.refusals.count(exc.reason, participant.name, exc.detail)
            return
        if state.tail_grad is None:
            participant.bytes_up += item.size
            state.tail_grad = (tail_grad, loss)

    # ------------------------------------------------------------------ the server's part

    async def _serve(self, arrived: dict[str, Activations], served: dict[str, Participant], step: int) -> set[str]:
        """The step's activations of these agents in merged passes, then every answer down: two-part, the
        gradient (:meth:`ServerModel.train_batch`); U split, the activations entering the tail
        (:meth:`ServerModel.forward_batch`; the step ends in :meth:`_finish`). The server's time is shared between
        the agents by their rows' tokens (what the controller's estimates expect per device batch). Returns the
        agents whose step is over (answered, or dropped)."""
        assert self.server is not None
        server, job = self.server, self.job
        items = [
            BatchItem(name, served[name].cut, act, server.num_layers - served[name].tail if job.u_split else 0)
            for name, act in sorted(arrived.items())
        ]
        run = server.forward_batch if job.u_split else server.train_batch
        t0 = time.perf_counter()
        results: Mapping[str, MiddleStep | StepResult] | None = await self._compute_or_drop(
            sorted(arrived), served, run, items, job.server_max_batch_tokens
        )
        if results is None:
            return set(arrived)
        elapsed = time.perf_counter() - t0
        total = sum(int(act.lengths.sum()) for act in arrived.values()) or 1
        for name, act in sorted(arrived.items()):
            participant, result = served[name], results[name]
            participant.server_times.append(elapsed * int(act.lengths.sum()) / total)
            if isinstance(result, MiddleStep):
                self._of(name).middle = (step, result)
                body = tail_act_body(result.top.detach(), job.wire_dtype)
                self._of(name).last_tail = (step, body)
                await self._send(participant, step, Kind.TAIL_ACT, body)
            else:
                await self._reply(participant, step, result)
        return set() if job.u_split else set(arrived)

    async def _finish(self, names: list[str], served: dict[str, Participant], step: int) -> None:
        """U split: the tail gradients of these agents through the backward pass of their merged passes
        (:meth:`ServerModel.backward_batch`), then every gradient at the cut down."""
        assert self.server is not None
        middles: dict[str, MiddleStep] = {}
        tail_grads: dict[str, torch.Tensor] = {}
        for name in names:  # (the loop gives only agents with both)
            held, tail = self._of(name).middle, self._of(name).tail_grad
            assert held is not None and tail is not None
            middles[name], tail_grads[name] = held[1], tail[0]
        t0 = time.perf_counter()
        grads = await self._compute_or_drop(names, served, self.server.backward_batch, middles, tail_grads)
        if grads is None:
            return
        elapsed = time.perf_counter() - t0
        total = sum(middles[n].tokens for n in names) or 1
        for name in names:
            participant, middle, state = served[name], middles[name], self._of(name)
            assert state.tail_grad is not None
            loss = state.tail_grad[1]
            participant.server_times[-1] += elapsed * middle.tokens / total
            state.middle = state.tail_grad = None
            await self._send(participant, step, Kind.GRAD, grad_body(grads[name], self.job.wire_dtype))
            participant.tokens += middle.tokens
            if loss is not None:
                participant.losses.append(loss)

    async def _compute_or_drop(
        self, names: list[str], served: dict[str, Participant], fn: Callable[..., T], *args: Any
    ) -> T | None:
        """The server's compute for these agents; if it fails (e.g. out of memory on this batch), they lose their
        round, not the job: dropped, and None."""
        try:
            return await self.member.compute(fn, *args)
        except RuntimeError as exc:
            log.exception("server step for %s failed", ", ".join(names))
            for name in names:
                self.roster.drop(served[name], f"the server could not process its batch ({exc})")
            return None

    async def _reply(self, participant: Participant, step: int, result: StepResult) -> None:
        """Two-part: the gradient at the agent's cut goes down; its step's figures are kept."""
        body = grad_body(result.grad, self.job.wire_dtype, result.loss, result.tokens)
        await self._send(participant, step, Kind.GRAD, body)
        participant.tokens += result.tokens
        participant.losses.append(result.loss)
        participant.accuracies.append(result.accuracy)

    async def _send(self, participant: Participant, step: int, kind: Kind, body: dict[str, Any]) -> None:
        """An answer down: the gradient at the cut ends the agent's step (its step time is taken), the tail
        activations are the U split's half-way answer."""
        name, state = participant.name, self._of(participant.name)
        if kind == Kind.GRAD:
            state.last_grad = (step, body)
        participant.bytes_down += await self.member.connected_link().publish(
            self.topics.agent(name, kind), kind, body, round_=self.roster.round, step=step, corr=participant.corr
        )
        if kind != Kind.GRAD:
            return
        now = time.monotonic()
        if state.last_grad_at:
            participant.step_times.append(now - state.last_grad_at)
        state.last_grad_at = now
