"""The coordinator's asyncio runtime: admit agents, run rounds, aggregate, evaluate, checkpoint, export.

One round::

    assign (cut, ranks, the global adapters of the device's blocks, steps, optimiser)  -> every agent
    for each local step:
        agent: activations up  ->  server: forward/backward from the cut, gradient down  -> agent
        U split: activations up -> server: forward to the agent's tail, activations down -> agent: tail,
                 loss, gradient up -> server: backward, gradient at the cut down -> agent
        (after every agent's step is in: one server optimiser step)
    adapter upload <- every agent;  aggregate (token-weighted, every block over its holders)
    evaluate; metrics line; checkpoint

The coordinator is built in layers, one module each, so that one part reads top to bottom in one file:
``session.py`` (state, membership, admission), ``steps.py`` (one step's message path: activations in,
gradients out), ``uploads.py`` (adapter uploads), ``rounds.py`` (the round loop and the cut controller),
and this module (the job from start to end, and the reader that dispatches incoming messages).

Compute runs in a worker thread (``asyncio.to_thread``) one item at a time, so the event loop keeps
reading the network (keep-alives, status changes) while the model works.

Faults. An agent that goes offline (its Last Will) and is not back within ``offline_grace_s`` (a
broker restart sends every member's Last Will, and they all reconnect at once), restarts, or misses a
step deadline is dropped from the round and told so (a ``notice``): its client-side update is left out of the aggregate, and it
is assigned again in the next round if it is back. Step deadlines come from the controller's predicted
step time times ``deadline_factor``, within ``[min_step_timeout_s, step_timeout_s]``. A round is only
applied if at least ``min_agents`` agents finished it; otherwise the server is rolled back to the
round's start and the round runs again. An adapter upload with NaN/Inf, or an update far larger than
the others', is refused and the agent told. Every assignment carries an id (``corr``) that the agent's
activations and upload repeat, so that nothing from an earlier assignment (another attempt, another
coordinator process) is ever applied; a repeated activation is answered with the gradient already
computed, never trained on twice. After a reconnect the agents re-send what they were waiting on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from splitft.coordinator.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    verify_checkpoint,
)
from splitft.coordinator.controller import Controller
from splitft.coordinator.estimates import FleetEstimates, adapter_block_bytes, block_memory_mb
from splitft.coordinator.rounds import Rounds
from splitft.coordinator.server import ServerModel, device_layout
from splitft.coordinator.session import eval_fields
from splitft.coordinator.workers import job_message, open_group
from splitft.shared.errors import JobError, Refusal, SplitFTError, WireError, WorkerLost
from splitft.shared.job.data import collate, eval_examples
from splitft.shared.model.loading import check_max_length, load_config, num_layers
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.codec import wire_bytes_per_element
from splitft.shared.wire.control import parse_join, parse_status
from splitft.shared.wire.link import Link
from splitft.shared.wire.topics import COORDINATOR, Kind

log = logging.getLogger(__name__)


class Coordinator(Rounds):
    """Runs one job to the end; ``await Coordinator(...).run()``."""

    # ------------------------------------------------------------------ main

    async def run(self) -> dict[str, Any]:
        if self.resume and (checkpoint := latest_checkpoint(self.out / "checkpoints")) is not None:
            verify_checkpoint(checkpoint)  # a damaged checkpoint is refused now, not after the agents joined
        self.out.mkdir(parents=True, exist_ok=True)
        # With workers, each rank subscribes to the step topics of its own agents (workers.route_step_topics).
        kinds = (
            ("status", "join", "adapter") if self._route_steps else ("status", "join", "act", "tail_grad", "adapter")
        )
        subscriptions = [self.topics.all_agents(k) for k in kinds]
        will = (self.topics.coordinator_status(), {"state": "offline", "role": COORDINATOR})
        async with Link(
            self.broker, self.topics, COORDINATOR, subscriptions, will=will, on_connect=self._announce,
            expect=self._expect, on_reject=lambda reason, topic: self.progress("rejected", {"reason": reason, "topic": topic}),
        ) as link:  # fmt: skip
            self._link = link
            await self._announce()
            try:
                # The reader is owned by a TaskGroup: should it fail, the job stops with its error.
                async with asyncio.TaskGroup() as group:
                    reader = group.create_task(self._read(), name="coordinator-reader")
                    try:
                        return await self._run_job()
                    finally:
                        reader.cancel()
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
            finally:
                if self.group is not None:
                    self.group.close()  # (after a failure the workers see rank 0 go, and stop)
                self._executor.shutdown(wait=False, cancel_futures=True)
                for task in list(self._background):
                    task.cancel()
                try:
                    topic, type_, body = self._status("offline")
                    # Retained with "done": an agent that missed the end learns it when it reconnects.
                    await link.publish(topic, type_, {**body, "done": self._done}, retain=True)
                except SplitFTError:
                    log.warning("could not publish the coordinator's offline status")

    async def _run_job(self) -> dict[str, Any]:
        # The job as run (file, flags and defaults merged), once the broker is reached: what a run folder
        # needs to be understood later.
        (self.out / "job.json").write_text(json.dumps(asdict(self.job), indent=2) + "\n")
        first_round = 1
        checkpoint = latest_checkpoint(self.out / "checkpoints") if self.resume else None
        state: dict[str, Any] = {}
        if self.resume and checkpoint is None:
            log.warning("--resume: no checkpoint in %s; starting from round 1", self.out / "checkpoints")
        if checkpoint is not None:
            state = read_state(checkpoint)
            first_round = int(state["round"]) + 1
            self._first_round = first_round
            self._elapsed_before = float(state.get("elapsed_s", 0.0))
            self._truncate_metrics(after=first_round - 1)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh metrics file

        if self.group is not None:
            await open_group(self.group, self.device, self._worker_processes)
        await self._admit()
        total = num_layers(load_config(self.job.model, self.job.attn_implementation))
        layouts = [device_layout(total, self.job.cut_of(n), self.job.tail_of(n)) for n in self._online()]
        cuts = state.get("cuts") or sorted({tuple(spec.cuts(total)) for spec in layouts})
        self.server = await self._compute(ServerModel, self.job, cuts, self.device)
        if self.group is not None:  # the workers build their server segments and connect to the broker
            try:
                await self._compute(self.group.broadcast, job_message(self.job, cuts, self.fingerprint))
                await self._compute(self.group.barrier)
            except WorkerLost as exc:
                raise JobError(f"a coordinator worker failed to start (its own error is in its log): {exc}") from exc
        # What waits for the step loop, per agent: four activation messages (a step ahead, repeats).
        self._events.per_sender_bytes = 4 * self._act_bytes()
        self.job.check_cuts(self.server.num_layers)
        check_max_length(self.server.segment.config, self.job.max_length)
        if checkpoint is not None:
            restored = await self._compute(load_checkpoint, checkpoint, self.server)
            log.info("resumed from %s: continuing at round %d", checkpoint, first_round)
            self.progress(
                "resumed", {"checkpoint": str(checkpoint), "round": first_round, "digest": restored["state_digest"]}
            )
        eval_batches = await self._compute(self._eval_batches)
        # Every policy predicts step times: they set the step deadlines and the achieved/ideal ratio.
        calibration = await self._compute(
            self.server.calibrate, self.job.batch_size, self.job.max_length, self.job.c_min
        )
        log.info(
            "server calibration: %.4f s per block, %.4f s head, per device batch",
            calibration.block_s,
            calibration.head_s,
        )
        block_mb = block_memory_mb(self.server.segment.config, self.job.batch_size, self.job.max_length)
        if self.job.u_split:  # the head is on the devices: the server's work per batch is its blocks alone
            calibration = replace(calibration, head_s=0.0)
        self.estimates = FleetEstimates(
            self.job.ewma, calibration, block_mb, self.job.server_speedup, round_trips=2 if self.job.u_split else 1,
            adapter_block_bytes=adapter_block_bytes(self.server.segment.lora_parameters()),
            local_steps=self.job.local_steps, step_bytes=self._step_bytes(),
        )  # fmt: skip
        self.controller = Controller(self._controller_settings(self.server.num_layers))
        if first_round == 1:
            result = await self._compute(self.server.evaluate, eval_batches)
            baseline = {"round": 0, "time_s": 0.0, **eval_fields(result)}
            self._write_metrics(baseline)
            self.progress("baseline", baseline)

        for round_ in range(first_round, self.job.rounds + 1):
            record = await self._run_round(round_, eval_batches)
            await self._compute(
                save_checkpoint,
                self.out / "checkpoints",
                round_,
                self.server,
                {"cuts": [list(c) for c in cuts], "elapsed_s": record["time_s"], "job": self.job.job},
            )

        adapter_dir = await self._compute(self.server.export, self.out / "adapter")
        if self.group is not None:
            try:
                await self._compute(self.group.broadcast, {"op": "done"})
            except WorkerLost as exc:  # the job is complete: a worker gone since its last round changes nothing
                log.warning("could not tell the workers the job is done: %s", exc)
        assert self._link is not None
        await self._link.publish(self.topics.job_topic("round"), Kind.ROUND, {"event": "done"}, round_=self.job.rounds)
        self._done = True
        summary = {"adapter": str(adapter_dir), "metrics": str(self.metrics_path), "rounds": self.job.rounds}
        self.progress("done", summary)
        return summary

    # ------------------------------------------------------------------ network input

    async def _read(self) -> None:
        assert self._link is not None
        link = self._link
        while True:
            received = await link.receive()
            name, kind, env = received.topic.agent, received.topic.kind, received.envelope
            assert name is not None
            try:
                if kind == "status":
                    # A Last Will can arrive after the same agent's new process joined: only the
                    # session that joined may take the agent offline.
                    info = self.agents.get(name)
                    if parse_status(env.body) == "offline" and (info is None or info.sid == env.sid):
                        self._agent_offline(name)
                elif kind == "join":
                    self._agent_joined(name, env.sid, parse_join(env.body))
                elif kind in ("act", "tail_grad"):
                    self._queue_step_message(received)
                    self._upload_arrived.set()  # wakes the upload wait, which answers repeated activations
                elif kind == "adapter":
                    self._adapter_arrived(received)
            except WireError as exc:
                self._count_rejection(exc.reason, name, exc.detail)
            except Exception as exc:  # never let one message end the reader
                log.exception("unexpected error handling a %s message from %s", kind, name)
                self._count_rejection(Refusal.HANDLER_ERROR, name, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ evaluation

    def _step_bytes(self) -> tuple[float, float]:
        """The bytes a step is expected to move up and down before any agent has reported (the job's shapes):
        the activations (and in the two-part split the labels, int64); the U split moves two tensors each way."""
        assert self.server is not None
        tokens, hidden = self.job.batch_size * self.job.max_length, self.server.hidden_size
        tensor = tokens * hidden * wire_bytes_per_element(self.job.wire_dtype, hidden)
        if self.job.u_split:
            return 2 * tensor, 2 * tensor
        return tensor + 8 * tokens, tensor

    def _eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        tokenizer = load_tokenizer(self.job.model)
        source = Path(self.job.eval_data) if self.job.eval_data else GSM8K / "test.jsonl"
        examples = eval_examples(source, tokenizer, self.job.max_length, self.job.eval_samples, self.job.chat_template)
        size = self.job.eval_batch_size
        pad = int(tokenizer.pad_token_id)
        return [collate(examples[i : i + size], pad) for i in range(0, len(examples), size)]
