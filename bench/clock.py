"""A simulated clock for studies on an emulated fleet: how long each round would take on the real devices.

In a study every part runs on this one host (the study, ``splitft.bench.study``): the agents compute at host speed
and report their device profiles' times (virtual emulation, agent/emulation.py), and the server is
this host's CPU. The wall clock then measures this host, not the fleet. This clock replays each round
as a discrete-event simulation from first principles instead:

* a device's compute is ``FLOPs / (profile peak x efficiency)`` (``splitft.shared.model.loading.block_flops``
  per block and direction; the LM head ``2 V C`` per token and direction);
* a message takes ``bytes * 8 / bandwidth + rtt / 2`` on the device's profiled link (the bytes are the
  ones the run really sent);
* the server's compute is FLOPs over its rates, which come from a named profile (a GPU class in
  ``firmware_profiles/``) or are given in TFLOP/s (:func:`server_from`), never from this host, so that a replay
  gives the same times on any machine (:func:`calibrate_server` measures this host, for comparison only);
* the events follow the protocol: a device gets the global adapters, then per step runs its forward,
  sends its activations, waits for the server (which serves one batch at a time, in arrival order, and
  steps its optimiser once every batch of the step is in, so a batch of step ``k + 1`` waits for the
  whole of step ``k``), gets the gradient, runs its backward; after its last step it uploads its adapters.
  In the U split the server's work on a batch comes in two parts: its forward pass, after which the
  device receives the activations at its tail, runs its tail, head and loss and sends the gradient
  back; then its backward pass, queued like any other work.

Federated learning without a split is the same with all the compute on the device and no messages but
the adapters; centralised training is the server's compute alone.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from splitft.shared.model.loading import block_flops, head_flops, num_layers
from splitft.shared.profiles import DeviceProfile, server_rates


@dataclass(frozen=True)
class Device:
    """A device class's speed and link, from its profile."""

    name: str
    flops_per_s: float
    uplink_bps: float
    downlink_bps: float
    rtt_s: float

    @classmethod
    def from_profile(cls, profile: DeviceProfile, scale: float = 1.0) -> Device:
        return cls(
            name=profile.name,
            flops_per_s=profile.throughput_gflops * 1e9 * scale,
            uplink_bps=profile.uplink_mbps * 1e6,
            downlink_bps=profile.downlink_mbps * 1e6,
            rtt_s=profile.rtt_ms / 1000,
        )

    def compute_s(self, flops: float) -> float:
        return flops / self.flops_per_s

    def up_s(self, nbytes: float) -> float:
        return nbytes * 8 / self.uplink_bps + self.rtt_s / 2

    def down_s(self, nbytes: float) -> float:
        return nbytes * 8 / self.downlink_bps + self.rtt_s / 2


@dataclass(frozen=True)
class Server:
    """The server's rates in FLOP/s, for the blocks and for the LM head (they run at different efficiency)."""

    block_flops_per_s: float
    head_flops_per_s: float


def server_from(spec: str) -> Server:
    """The server's rates from ``spec``: a profile name or ``.toml`` file, or ``"blocks,head"`` in TFLOP/s
    (:func:`splitft.shared.profiles.server_rates`)."""
    return Server(*server_rates(spec))


def server_label(server: Server) -> str:
    """``"blocks,head"`` in TFLOP/s, as :func:`server_from` reads it back."""
    return f"{server.block_flops_per_s / 1e12:.6g},{server.head_flops_per_s / 1e12:.6g}"


@dataclass(frozen=True)
class CostModel:
    """Seconds of compute for one model, on the devices and on the server."""

    config: PretrainedConfig
    server: Server

    @property
    def layers(self) -> int:
        return num_layers(self.config)

    def device_pass_s(
        self, device: Device, blocks: int, batch: int, length: int, head: bool = False, head_tokens: int | None = None
    ) -> float:
        """One direction (forward, or backward) of ``blocks`` blocks, and the head if it is on the device (on
        ``head_tokens`` tokens: the U split's device computes it at the target positions only)."""
        flops = blocks * block_flops(self.config, batch, length)
        if head:
            flops += head_flops(self.config, 1, batch * length if head_tokens is None else head_tokens)
        return device.compute_s(flops)

    def server_middle_s(self, cut: int, tail: int, batch: int, length: int) -> float:
        """U split: the forward (or the backward) of one device batch through blocks ``cut..L-tail-1``."""
        return (self.layers - cut - tail) * block_flops(self.config, batch, length) / self.server.block_flops_per_s

    def server_batch_s(self, cut: int, batch: int, length: int, head_tokens: int | None = None) -> float:
        """Forward and backward of one device batch from block ``cut`` through the head (cut 0: the whole model);
        the head on ``head_tokens`` tokens (the server's split step computes it at the target positions only)."""
        blocks = (self.layers - cut) * 2 * block_flops(self.config, batch, length)
        head = head_flops(self.config, 1, batch * length if head_tokens is None else head_tokens)
        return blocks / self.server.block_flops_per_s + 2 * head / self.server.head_flops_per_s


@dataclass(frozen=True)
class SplitStep:
    """One step of one device in a split round, in seconds."""

    forward_s: float
    up_s: float  # activations to the server
    server_s: float  # the server's work on this batch (in the U split: its forward pass)
    down_s: float  # the gradient back
    backward_s: float
    # The U split: the server's activations down, the device's tail (blocks, head, loss, forward and
    # backward), the gradient at the tail up, and the server's backward pass. None: the two-part split.
    tail: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class SplitParticipant:
    name: str
    adapter_down_s: float  # the assignment with the global adapters
    steps: Sequence[SplitStep]
    adapter_up_s: float  # the adapter upload after the last step


@dataclass
class RoundTiming:
    seconds: float  # from the first assignment sent to the last upload received
    step_ends: list[float] = field(default_factory=list)  # when the server finished each step's last batch
    server_busy_s: float = 0.0
    device_finish: dict[str, float] = field(default_factory=dict)

    @property
    def mean_step_s(self) -> float:
        """The steady step time: between the ends of the first and the last step (the first step alone
        when there is one)."""
        if len(self.step_ends) < 2:
            return self.step_ends[0] if self.step_ends else 0.0
        return (self.step_ends[-1] - self.step_ends[0]) / (len(self.step_ends) - 1)


def split_round(participants: Sequence[SplitParticipant]) -> RoundTiming:
    """Simulate one split round event by event (see the module docstring for the rules)."""
    if not participants:
        return RoundTiming(0.0)
    steps = len(participants[0].steps)
    if any(len(p.steps) != steps for p in participants):
        raise ValueError("every participant of a round runs the same number of steps")
    events: list[tuple[float, int, str, int, int]] = []  # (time, order, kind, participant, step)
    order = 0

    def push(t: float, kind: str, i: int, k: int) -> None:
        nonlocal order
        heapq.heappush(events, (t, order, kind, i, k))
        order += 1

    for i, p in enumerate(participants):
        if steps:
            push(p.adapter_down_s + p.steps[0].forward_s + p.steps[0].up_s, "arrive", i, 0)
        else:
            push(p.adapter_down_s + p.adapter_up_s, "finish", i, 0)
    waiting: list[tuple[float, int, bool]] = []  # work of the current step (arrival, participant, a backward)
    later: dict[int, list[tuple[float, int, bool]]] = {}  # arrivals of later steps, held for the barrier
    current, served, server_free = 0, 0, 0.0
    timing = RoundTiming(0.0)
    while events:
        t, _, kind, i, k = heapq.heappop(events)
        p = participants[i]
        tail = p.steps[k].tail if k < steps else None
        if kind == "arrive":
            (waiting if k == current else later.setdefault(k, [])).append((t, i, False))
        elif kind == "back":  # U split: the gradient at the device's tail reached the server
            waiting.append((t, i, True))
        elif kind == "forwarded":  # U split: the server's forward is done; the device runs its tail
            assert tail is not None
            tail_down_s, tail_s, tail_up_s, _ = tail
            push(t + tail_down_s + tail_s + tail_up_s, "back", i, k)
        elif kind == "served":
            served += 1
            step = p.steps[k]
            done = t + step.down_s + step.backward_s
            if k + 1 < steps:
                push(done + p.steps[k + 1].forward_s + p.steps[k + 1].up_s, "arrive", i, k + 1)
            else:
                push(done + p.adapter_up_s, "finish", i, k)
            if served == len(participants):  # the step is complete: the optimiser steps, the next opens
                timing.step_ends.append(t)
                current, served = current + 1, 0
                waiting = later.pop(current, [])
        elif kind == "finish":
            timing.device_finish[p.name] = t
            timing.seconds = max(timing.seconds, t)
        # The server takes the earliest waiting work of the open step once it is free (when it is busy,
        # its "served" or "forwarded" event comes back here).
        if waiting and server_free <= t:
            waiting.sort()
            arrived, j, backward = waiting.pop(0)
            start = max(arrived, server_free, t)
            step = participants[j].steps[current]
            work = step.tail[3] if backward and step.tail is not None else step.server_s
            server_free = start + work
            timing.server_busy_s += work
            push(server_free, "forwarded" if step.tail is not None and not backward else "served", j, current)
    return timing


@dataclass(frozen=True)
class LocalParticipant:
    """One device of a round without a split: all its compute is local."""

    name: str
    adapter_down_s: float
    compute_s: Sequence[float]  # forward + backward of each step
    adapter_up_s: float


def local_round(participants: Sequence[LocalParticipant]) -> RoundTiming:
    """A federated round without a split: the slowest device's download, steps and upload."""
    finish = {p.name: p.adapter_down_s + sum(p.compute_s) + p.adapter_up_s for p in participants}
    return RoundTiming(max(finish.values(), default=0.0), device_finish=finish)


def calibrate_server(
    model: str, batch: int, length: int, repeats: int = 2, device: str = "cpu", seed: int = 0
) -> tuple[Server, dict[str, float]]:
    """Measure this host's rates for the blocks and for the head on the model's whole LoRA segment.

    Times forward + backward of a (batch, length) batch of random hidden states from the second block
    and from the last one (the difference is the blocks), the best of ``repeats`` after a warm-up.
    """
    from splitft.shared.model.loading import load_config
    from splitft.shared.model.lora import LoraSettings
    from splitft.shared.model.loss import causal_lm_loss
    from splitft.shared.model.split import SegmentSpec, build_segment

    config = load_config(model)
    layers = num_layers(config)
    segment = build_segment(model, SegmentSpec.whole(layers), lora=LoraSettings(), device=device)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, int(config.hidden_size), generator=gen)
    labels = torch.randint(0, int(config.vocab_size), (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)

    def timed(start: int) -> float:
        best = math.inf
        for _ in range(repeats + 1):  # the first pass warms up
            x = hidden.clone().to(device).requires_grad_()
            t0 = time.perf_counter()
            loss = causal_lm_loss(segment(x, mask.to(device), start=start), labels.to(device))
            loss.backward()
            best = min(best, time.perf_counter() - t0)
        segment.zero_grad(set_to_none=True)
        return best

    shallow, deep = timed(1), timed(layers - 1)
    block_s = max((shallow - deep) / (layers - 2), 1e-9)
    head_s = max(deep - block_s, 1e-9)
    server = Server(
        block_flops_per_s=2 * block_flops(config, batch, length) / block_s,
        head_flops_per_s=2 * head_flops(config, batch, length) / head_s,
    )
    return server, {"block_s": block_s, "head_s": head_s, "batch": batch, "length": length}
