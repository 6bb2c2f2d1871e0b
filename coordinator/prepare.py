"""What the coordinator builds before and between rounds: the server segment (and the workers'), the evaluation
batches, the fleet's first estimates, and an agent's assignment."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from splitft.coordinator.controller import ServerEstimate
from splitft.coordinator.estimates import FleetEstimates, adapter_block_bytes, block_memory_mb
from splitft.coordinator.layout import device_layout
from splitft.coordinator.private import PrivateAdapters
from splitft.coordinator.roster import Participant
from splitft.coordinator.server import ServerModel
from splitft.coordinator.workers import WorkerGroup, job_message, open_group
from splitft.shared.errors import JobError, WorkerLost
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import collate, eval_examples
from splitft.shared.member import Member
from splitft.shared.model.calibration import public_clips
from splitft.shared.model.loading import block_flops, check_max_length, head_flops, load_config, num_layers
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.profiles import server_rates
from splitft.shared.wire.codec import encode_state, wire_bytes_per_element
from splitft.shared.wire.control import Assignment, assign_body

log = logging.getLogger(__name__)


async def build_server(
    member: Member,
    job: JobConfig,
    device: str,
    online: Sequence[str],
    state: dict[str, Any],
    group: WorkerGroup | None,
    worker_processes: Sequence[subprocess.Popen[bytes]],
    fingerprint: str,
) -> tuple[ServerModel, list[Any]]:
    """The server segment, built for the layouts of the agents ``online`` (or a checkpoint's, in ``state``), and
    with workers, theirs too once every rank joined. Returns it and the layouts."""
    if group is not None:
        await open_group(group, device, worker_processes)
    total = num_layers(load_config(job.model, job.attn_implementation))
    layouts = [device_layout(total, job.cut_of(n), job.tail_of(n)) for n in online]
    cuts = state.get("cuts") or sorted({tuple(spec.cuts(total)) for spec in layouts})
    server = await member.compute(ServerModel, job, cuts, device)
    if group is not None:  # the workers build their server segments and connect to the broker
        try:
            await member.compute(group.broadcast, job_message(job, cuts, fingerprint))
            await member.compute(group.barrier)
        except WorkerLost as exc:
            raise JobError(f"a coordinator worker failed to start (its own error is in its log): {exc}") from exc
    job.check_cuts(server.num_layers)
    check_max_length(server.segment.config, job.max_length)
    return server, cuts


def eval_batches(job: JobConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    tokenizer = load_tokenizer(job.model)
    source = Path(job.eval_data) if job.eval_data else GSM8K / "test.jsonl"
    examples = eval_examples(source, tokenizer, job.max_length, job.eval_samples, job.chat_template)
    size = job.eval_batch_size
    pad = int(tokenizer.pad_token_id)
    return [collate(examples[i : i + size], pad) for i in range(0, len(examples), size)]


async def fleet_estimates(member: Member, job: JobConfig, server: ServerModel) -> FleetEstimates:
    """The controller's estimates before any device reported: the server calibrated on this host, the job's
    shapes. Every policy predicts step times: they set the step deadlines and the achieved/ideal ratio."""
    if job.emulate_server is not None:  # the server is a stated one, not this host: nothing is measured
        blocks, head = server_rates(job.emulate_server)
        config = server.segment.config
        calibration = ServerEstimate(
            block_s=2 * block_flops(config, job.batch_size, job.max_length) / blocks,
            head_s=2 * head_flops(config, job.batch_size, job.max_length) / head,
        )
        log.info(
            "server emulated as %s: %.5f s per block, %.5f s head, per device batch",
            job.emulate_server, calibration.block_s, calibration.head_s,
        )  # fmt: skip
    else:
        calibration = await member.compute(server.calibrate, job.batch_size, job.max_length, job.c_min)
        log.info(
            "server calibration: %.4f s per block, %.4f s head, per device batch",
            calibration.block_s, calibration.head_s,
        )  # fmt: skip
    block_mb = block_memory_mb(server.segment.config, job.batch_size, job.max_length)
    if job.u_split:  # the head is on the devices: the server's work per batch is its blocks alone
        calibration = replace(calibration, head_s=0.0)
    return FleetEstimates(
        job.ewma, calibration, block_mb, job.server_speedup, round_trips=2 if job.u_split else 1,
        measure_server=job.emulate_server is None,
        adapter_block_bytes=adapter_block_bytes(server.segment.lora_parameters()),
        local_steps=job.local_steps, step_bytes=step_bytes(job, server.hidden_size),
        tail_of=job.tail_of if job.u_split else None,
    )  # fmt: skip


def step_bytes(job: JobConfig, hidden: int) -> tuple[float, float]:
    """The bytes a step is expected to move up and down before any agent has reported (the job's shapes):
    the activations (and in the two-part split the labels, int64); the U split moves two tensors each way."""
    tokens = job.batch_size * job.max_length
    tensor = tokens * hidden * wire_bytes_per_element(job.wire_dtype, hidden)
    if job.u_split:
        return 2 * tensor, 2 * tensor
    return tensor + 8 * tokens, tensor


def calibrated_clips(job: JobConfig, total: int) -> dict[int, float]:
    """The clip of each cut the job may use, when its defense calibrates the clip per cut (else none)."""
    quantile = job.defense.clip_quantile
    if quantile is None:
        return {}
    cuts = tuple(range(max(1, job.c_min), (job.c_max or total - 1) + 1))
    cuts = tuple(sorted({*cuts, job.cut, *job.cuts.values()}))
    return public_clips(job.model, cuts, quantile)


def encode_assignment(
    job: JobConfig,
    fingerprint: str,
    round_: int,
    attempt: int,
    participant: Participant,
    clips: dict[int, float],
    private: PrivateAdapters,
    ranks: Mapping[int, int],
) -> dict[str, Any]:
    """The body of ``participant``'s assignment: its cut, ranks and adapters, and the job's settings for it
    (a defense calibrated per cut gets the clip of the participant's cut from ``clips``; with private adapters,
    the sealed uploads to average and the job's ``ranks`` of the private blocks)."""
    defense = job.defense
    if defense.clip_quantile is not None:
        defense = defense.calibrated(clips[participant.cut])
    assignment = Assignment(
        round=round_,
        model=job.model,
        fingerprint=fingerprint,
        cut=participant.cut,
        ranks=participant.ranks,
        lora=job.lora,
        adapter=encode_state(private.to_send(participant.sent), job.adapter_wire_dtype),
        local_steps=job.local_steps,
        batch_size=job.batch_size,
        max_length=job.max_length,
        optimizer=job.optimizer,
        wire_dtype=job.wire_dtype,
        adapter_wire_dtype=job.adapter_wire_dtype,
        step_timeout_s=job.step_timeout_s,
        seed=job.seed,
        attempt=attempt,
        corr=participant.corr,
        split=job.split,
        tail=participant.tail,
        report_loss=job.report_loss,
        defense=defense,
        chat_template=job.chat_template,
        private=private.blocks,
        private_ranks=tuple(ranks[b] for b in range(private.blocks)),
        sealed=tuple(private.sealed),
    )
    return assign_body(assignment)
