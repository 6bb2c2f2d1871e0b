"""One round of an agent's work on the device: from an assignment to the adapter upload.

On an assignment the :class:`Trainer` builds (or reuses) the client segment for its cut, loading only
those blocks, loads the global adapters it is sent, and trains ``local_steps`` steps: forward,
activations up, wait for the gradient, backward, optimiser step (the model work itself is in
agent/step.py). Every step reports its timings in the next message. A gradient that does not come by
the step deadline ends the round with :class:`~splitft.shared.errors.RoundAborted`, as the agent's
``interrupt`` does for a message that says the round is over for it (agent/runtime.py).

In the U split (``split = "u"``) the device also holds the last ``tail`` blocks, the final norm and
the LM head: a step sends the activations at the cut up (no labels), receives the server's
activations entering its tail, computes the loss on its own labels, sends the gradient at the tail
up and receives the gradient at the cut. No token id or label leaves the device.

Activations and the adapter upload repeat the assignment's id (``corr``). The message waiting for its
answer (:attr:`Trainer.pending`) and the last upload (:attr:`Trainer.last_upload`) are kept for the agent
to re-send after a reconnect.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from splitft.agent.emulation import Emulation, block_flops
from splitft.agent.private import received_adapters, split_upload
from splitft.agent.profile import peak_rss_mb
from splitft.agent.step import backward, forward, tail_step
from splitft.shared.errors import ConfigError, RoundAborted, WireError
from splitft.shared.job.data import Batches, Example, tokenize
from splitft.shared.job.records import Record
from splitft.shared.member import Member
from splitft.shared.model.loading import head_flops, num_layers
from splitft.shared.model.lora import load_lora_state, lora_state
from splitft.shared.model.loss import IGNORE_INDEX
from splitft.shared.model.split import Segment, SegmentSpec
from splitft.shared.wire.control import Assignment
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.messages import adapter_body, parse_grad, parse_tail_act, tail_grad_body
from splitft.shared.wire.topics import Kind, Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: ``interrupt(assignment, message)``: a message other than the awaited answer came during a step; raises
#: RoundAborted when it ends the round for this agent (agent/runtime.py)
Interrupt = Callable[[Assignment, Received], Awaitable[None]]


@dataclass(frozen=True)
class Outgoing:
    """A message kept to be sent again after a reconnect."""

    topic: str
    type: str
    body: dict[str, Any]
    round: int
    step: int
    corr: str


@dataclass(frozen=True)
class TailStep:
    """What a U-split device did between its activations going up and the gradient at its cut coming down."""

    loss: float  # mean cross-entropy over its target tokens
    compute_s: float  # the tail's forward and backward, head and loss included
    head_s: float  # the head's share of compute_s (by FLOPs)
    upload_s: float
    bytes_up: int
    bytes_down: int
    decode_s: float


class Trainer:
    """An agent's rounds on the device: its segment, its data, and the steps of each assignment."""

    def __init__(
        self,
        name: str,
        topics: Topics,
        model: str,
        model_config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase,
        records: list[Record],
        *,
        device: str,
        dtype: torch.dtype,
        emulation: Emulation | None,
        member: Member,
        build_segment: Callable[..., Segment],
        refuse: Callable[[str, WireError], None],
        interrupt: Interrupt,
        upload_state: Callable[[Segment], dict[str, torch.Tensor]],
        fleet_key: bytes | None = None,
    ) -> None:
        self.name = name
        self.topics = topics
        self.model = model
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.records = records
        self.device = device
        self.dtype = dtype
        self.emulation = emulation
        self.member = member  # all model work on the agent's one compute thread
        self._build_segment = build_segment
        self._refuse = refuse  # a malformed answer: counted and logged by the agent
        self._interrupt = interrupt
        self._upload_state = upload_state  # the adapters to upload (the agent's: tests inject faults there)
        self._fleet_key = fleet_key  # private adapters are sealed with it (agent/private.py)
        self._segment: Segment | None = None
        self._segment_key: tuple[Any, ...] | None = None
        self._examples: dict[tuple[int, str | bool], list[Example]] = {}
        self._batches: dict[tuple[int, int, int, str | bool], Batches] = {}
        self.pending: Outgoing | None = None  # activations (or the U split's tail gradient) waiting for an answer
        self.last_upload: Outgoing | None = None  # the adapter upload of the last assignment

    @property
    def num_layers(self) -> int:
        return num_layers(self.model_config)

    # ------------------------------------------------------------------ one round

    async def train(self, a: Assignment, link: Link) -> None:
        segment = await self.member.compute(self._segment_for, a)
        shapes = {n: tuple(p.shape) for n, p in segment.lora_parameters().items()}
        state = await self.member.compute(received_adapters, a, shapes, self._fleet_key, self.topics.job)
        load_lora_state(segment.peft_model, {n: t.to(segment.device) for n, t in state.items()})
        optimizer = a.optimizer.build(segment.lora_parameters().values())
        batches = self._batches_for(a)
        # The batches of (round, step) are a function of the seed and this agent's name alone: a round that
        # runs again (a retry, a resumed coordinator) trains on the same data, and two runs on the same data.
        batches.seek((a.round - 1) * a.local_steps)
        totals: dict[str, float] = {}
        timings: dict[str, float] = {}
        tokens, losses = 0, []
        noise = torch.Generator(device=segment.device).manual_seed(batch_seed(a.seed, self.name) + a.round)
        for step in range(a.local_steps):
            started = time.perf_counter()
            input_ids, labels, lengths = batches.next()

            flops = a.cut * block_flops(self.model_config, input_ids.shape[0], input_ids.shape[1])
            hidden, extra, body, forward_s = await self.member.compute(
                forward, segment, input_ids, None if a.u_split else labels, lengths, a.wire_dtype, timings,
                self.emulation, flops, a.defense, noise,
            )  # fmt: skip
            encode_s = time.perf_counter() - started - forward_s
            upload_s, bytes_up = await self._send(link, a, step, Kind.ACT, body)
            sent_at = time.perf_counter()
            tail = await self._tail_exchange(link, a, step, segment, labels, lengths, hidden) if a.u_split else None
            received, (grad, server_loss, server_tokens), received_at, decode_s = await self._wait_reply(
                link, a, step, "grad", functools.partial(parse_grad, shape=tuple(hidden.shape), with_loss=tail is None)
            )
            if tail is not None:
                # Tokens: the rows' real lengths (they travel as the mask); the target count stays here.
                loss, step_tokens = (tail.loss if a.report_loss else None), int(lengths.sum())
                upload_s += tail.upload_s
                bytes_up += tail.bytes_up
                wait_s = received_at - sent_at - tail.compute_s - tail.upload_s
            else:
                assert server_loss is not None and server_tokens is not None  # parse_grad(with_loss=True)
                loss, step_tokens = server_loss, server_tokens
                wait_s = received_at - sent_at
            self.pending = None

            backward_s = await self.member.compute(backward, hidden, grad, optimizer, self.emulation, flops, extra)
            blocks = a.cut + a.tail
            timings = {
                "forward_s": forward_s,
                "encode_s": encode_s,
                "upload_s": upload_s,
                "wait_s": wait_s,
                "decode_s": decode_s,
                "backward_s": backward_s,
                "step_s": time.perf_counter() - started,
                "bytes_up": float(bytes_up),
                "bytes_down": float(received.size),
                "tokens_padded": float(input_ids.numel()),  # the batch as computed and sent, padding included
                "rss_mb": psutil.Process().memory_info().rss / 2**20,
                "peak_rss_mb": peak_rss_mb(),
            }
            if tail is not None:
                # The tail's time split by FLOPs between its blocks and the head (norm, LM head, loss).
                timings.update(
                    tail_s=tail.compute_s, head_s=tail.head_s, bytes_down=float(received.size + tail.bytes_down)
                )
                timings["decode_s"] += tail.decode_s
            # This device's cost of one block, forward + backward (the head apart).
            timings["block_s"] = (
                forward_s + backward_s + timings.get("tail_s", 0.0) - timings.get("head_s", 0.0)
            ) / blocks
            for key, value in timings.items():
                totals[key] = totals.get(key, 0.0) + value
            tokens += step_tokens
            if loss is not None:
                losses.append(loss)
        mean = {k: v / a.local_steps for k, v in totals.items()}
        state_out, sealed = split_upload(a, self._upload_state(segment), self._fleet_key, self.topics.job, self.name)
        body = adapter_body(
            state_out,
            max(tokens, 1),
            a.local_steps * a.batch_size,
            sum(losses) / len(losses) if losses else None,
            mean,
            a.adapter_wire_dtype,
            sealed,
        )
        self.last_upload = Outgoing(self.topics.agent(self.name, "adapter"), Kind.ADAPTER, body, a.round, -1, a.corr)
        await link.publish(self.topics.agent(self.name, "adapter"), Kind.ADAPTER, body, round_=a.round, corr=a.corr)

    async def _send(self, link: Link, a: Assignment, step: int, type_: str, body: dict[str, Any]) -> tuple[float, int]:
        """Publish a step's message (kept to re-send after a reconnect until its answer comes): (seconds, bytes)."""
        t0 = time.perf_counter()
        topic = self.topics.agent(self.name, type_)
        self.pending = Outgoing(topic, type_, body, a.round, step, a.corr)
        sent = await link.publish(topic, type_, body, round_=a.round, step=step, corr=a.corr)
        if self.emulation is not None:
            await self.emulation.wait_link(self.emulation.uplink_s(sent))
        return time.perf_counter() - t0, sent

    async def _tail_exchange(
        self,
        link: Link,
        a: Assignment,
        step: int,
        segment: Segment,
        labels: torch.Tensor,
        lengths: torch.Tensor,
        hidden: torch.Tensor,
    ) -> TailStep:
        """U split: take the server's activations at the tail, run the tail and the loss here, send the gradient up."""
        tail_start = self.num_layers - a.tail
        received, top, _, decode_s = await self._wait_reply(
            link, a, step, "tail_act", functools.partial(parse_tail_act, shape=tuple(hidden.shape))
        )
        config = self.model_config
        batch, length = labels.shape
        head = head_flops(config, 1, int((labels[:, 1:] != IGNORE_INDEX).sum()))  # the head runs on targets only
        flops = 2 * (a.tail * block_flops(config, batch, length) + head)
        grad, loss, compute_s = await self.member.compute(
            tail_step, segment, top, labels, lengths, tail_start, self.emulation, flops
        )
        body = tail_grad_body(grad, a.wire_dtype, loss if a.report_loss else None)
        upload_s, sent = await self._send(link, a, step, Kind.TAIL_GRAD, body)
        head_s = compute_s * 2 * head / flops  # the head's share, by FLOPs
        return TailStep(loss, compute_s, head_s, upload_s, sent, received.size, decode_s)

    async def _wait_reply(
        self, link: Link, a: Assignment, step: int, kind: str, parse: Callable[[dict[str, Any]], T]
    ) -> tuple[Received, T, float, float]:
        """This step's answer of ``kind`` ("grad", or "tail_act" in the U split), parsed:
        (message, what ``parse`` made of its body, when it arrived, decode seconds).

        A malformed answer is refused and the wait goes on (the real one may still come)."""
        # The coordinator's deadline runs from the start of its step and it serves agents one after the
        # other: wait twice as long, so that it is always the coordinator that gives up first.
        deadline = time.monotonic() + 2 * a.step_timeout_s
        while True:
            try:
                received = await link.receive(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError as exc:
                raise RoundAborted(f"no {kind} for step {step} within {a.step_timeout_s:g} s") from exc
            got, env = received.topic.kind, received.envelope
            if got == kind and env.round == a.round and env.step == step and env.corr == a.corr:
                received_at = time.perf_counter()
                if self.emulation is not None:
                    await self.emulation.wait_link(self.emulation.downlink_s(received.size))
                t_dec = time.perf_counter()
                try:
                    parsed = parse(env.body)
                except WireError as exc:
                    self._refuse(got, exc)
                    continue
                return received, parsed, received_at, time.perf_counter() - t_dec
            if got in ("grad", "tail_act"):
                continue  # a stale or repeated answer (an earlier step, an abandoned assignment)
            await self._interrupt(a, received)

    # ------------------------------------------------------------------ segments and data

    def _segment_for(self, a: Assignment) -> Segment:
        key = (a.cut, a.tail, a.split, tuple(sorted(a.ranks.items())), a.lora)
        if self._segment is None or self._segment_key != key:
            # Only the blocks held are loaded (0..cut-1, and the tail in the U split); a new cut, a new segment.
            spec = SegmentSpec.u_device(a.cut, a.tail, self.num_layers) if a.u_split else SegmentSpec.client(a.cut)
            self._segment = self._build_segment(
                self.model,
                spec,
                lora=a.lora,
                ranks=a.ranks,
                lora_seed=a.seed,
                device=self.device,
                dtype=self.dtype,
            )
            self._segment_key = key
        return self._segment

    def _examples_at(self, max_length: int, chat_template: str | bool) -> list[Example]:
        """This agent's examples at ``max_length`` tokens (tokenized once per length and rendering)."""
        key = (max_length, chat_template)
        if key not in self._examples:
            self._examples[key] = tokenize(self.records, self.tokenizer, max_length, chat_template)
        return self._examples[key]

    def usable(self, max_length: int, chat_template: str | bool) -> int:
        """How many records the job's settings leave something to learn in (0 where they cannot render this
        agent's data). A long text makes several examples: the count is capped at the records."""
        try:
            return min(len(self._examples_at(max_length, chat_template)), len(self.records))
        except ConfigError as exc:  # e.g. chat_template = true and this tokenizer has none
            log.warning("%s: %s", self.name, exc)
            return 0

    def _batches_for(self, a: Assignment) -> Batches:
        key = (a.max_length, a.batch_size, a.seed, a.chat_template)
        if key not in self._batches:
            pad = int(self.tokenizer.pad_token_id)
            seed = batch_seed(a.seed, self.name)
            examples = self._examples_at(a.max_length, a.chat_template)
            self._batches[key] = Batches(examples, a.batch_size, pad, seed=seed)
        return self._batches[key]


def upload_state(segment: Segment) -> dict[str, torch.Tensor]:
    """The client-side adapters an agent uploads at the end of a round."""
    return {n: t.detach().cpu() for n, t in lora_state(segment.peft_model).items()}


def batch_seed(job_seed: int, agent: str) -> int:
    """Each agent its own data order, fixed by the job seed and its name: reruns see the same batches."""
    return job_seed * 1_000_003 + zlib.crc32(agent.encode())
