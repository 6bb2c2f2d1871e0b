"""Latency estimates the controller decides from: EWMA-smoothed device and server costs.

Devices report, with every adapter upload, their mean per-step timings: ``block_s`` (forward plus
backward per block), bytes up and down, the time their uploads took (``upload_s``), and in the U split
``head_s`` (the head and loss on the device). Their link comes from their join profile when they know it
(an emulated device does), and is taken as free otherwise, unless the uploads they time say it is
slower: then the measured uplink is used, and the downlink is taken to have slowed in the same
proportion (a link that degrades, Wi-Fi to cellular, is seen one round after it happened). Each
figure is an EWMA, except that a measurement off by :data:`CHANGE_RATIO` or more replaces it. The server's cost is calibrated once
(one forward/backward from the shallowest and from the deepest cut gives the per-block and the
head cost) and then scaled, round by round, by how its measured time per device batch compares
with the prediction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from splitft.coordinator.controller import DeviceEstimate, ServerEstimate
from splitft.shared.model.loading import block_params
from splitft.shared.model.memory import MemoryFigures

#: A measurement this far from the estimate (either way, as a ratio) is a change, not noise: the estimate
#: restarts from it instead of creeping towards it (a device that throttles, a link that degrades).
CHANGE_RATIO = 2.0


@dataclass
class Ewma:
    weight: float  # of the newest value
    value: float | None = None
    change: float = CHANGE_RATIO

    def update(self, x: float) -> float:
        if self.value is None or (x > 0 < self.value and max(x / self.value, self.value / x) >= self.change):
            self.value = x
        else:
            self.value = self.weight * x + (1 - self.weight) * self.value
        return self.value


@dataclass
class _Device:
    block: Ewma
    up: Ewma
    down: Ewma
    fixed: Ewma  # the device's per-step cost that does not depend on its blocks (the U split's head)
    upload: Ewma  # seconds its uploads of a step took
    profile: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None


class FleetEstimates:
    def __init__(
        self,
        weight: float,
        server: ServerEstimate,
        block_mb: float,
        server_speedup: float = 1.0,
        round_trips: int = 1,
        adapter_block_bytes: float = 0.0,
        local_steps: int = 1,
        step_bytes: tuple[float, float] = (0.0, 0.0),
        change_ratio: float = CHANGE_RATIO,
        measure_server: bool = True,
        tail_of: Callable[[str], int] | None = None,
    ) -> None:
        """``server`` is the server's calibration; the estimates see it, and every later measurement of it,
        ``server_speedup`` times faster (an emulated study's stand-in for a faster server; 1 in real jobs).
        ``round_trips``: the link round trips of a step (2 in the U split, whose devices also hold the head).
        ``adapter_block_bytes``: one client block's adapters on the wire, sent each way once a round of
        ``local_steps`` steps.
        ``step_bytes``: the bytes a step is expected to send up and down (the job's shapes), used for a
        device until it reports its own (its first round, planned from its join measurement).
        ``change_ratio``: see :data:`CHANGE_RATIO` (``math.inf``: smooth every measurement).
        ``measure_server``: False keeps ``server`` as it is (an emulated server, the job's ``emulate_server``):
        the server's measured times then change nothing.
        ``tail_of``: the U split's tail depth of a device (its estimate's ``tail_blocks``); None: the two-part split."""
        self.weight = weight
        self.round_trips = round_trips
        self.adapter_block_bytes = adapter_block_bytes
        self.local_steps = local_steps
        self.step_bytes = step_bytes
        self.change_ratio = change_ratio
        self.server_speedup = server_speedup
        self.measure_server = measure_server
        self.tail_of = tail_of
        self.base_server = ServerEstimate(
            block_s=server.block_s / server_speedup, head_s=server.head_s / server_speedup
        )
        self.server_scale = Ewma(weight, 1.0)
        self.block_mb = block_mb  # memory one client block needs on a device (weights + activations)
        self._devices: dict[str, _Device] = {}

    def observe_device(
        self, name: str, timings: Mapping[str, float], profile: Mapping[str, Any], accuracy: float | None
    ) -> None:
        d = self._new(name)
        d.profile = dict(profile)
        if timings.get("block_s", 0) > 0:
            d.block.update(float(timings["block_s"]))
        d.fixed.update(float(timings.get("head_s", 0.0)))
        d.up.update(float(timings.get("bytes_up", 0.0)))
        d.down.update(float(timings.get("bytes_down", 0.0)))
        if timings.get("upload_s", 0) > 0:
            d.upload.update(float(timings["upload_s"]))
        d.accuracy = accuracy

    def observe_join(self, name: str, profile: Mapping[str, Any], job_tokens: int) -> None:
        """A joining device's own measurement seeds its estimate until its first report.

        The device timed one block at ``block_tokens`` tokens per step; the cost scales with tokens.
        """
        d = self._new(name)
        d.profile = dict(profile)
        block, tokens = profile.get("block_s"), profile.get("block_tokens")
        if d.block.value is None and isinstance(block, (int, float)) and isinstance(tokens, int) and block > 0 < tokens:
            d.block.update(float(block) * job_tokens / tokens)

    def _new(self, name: str) -> _Device:
        w, change = self.weight, self.change_ratio
        block, up, down, fixed, upload = (Ewma(w, change=change) for _ in range(5))
        return self._devices.setdefault(name, _Device(block, up, down, fixed, upload))

    def observe_server(self, num_layers: int, cut: int, seconds: float) -> None:
        if not self.measure_server:
            return
        seconds /= self.server_speedup
        predicted = self.base_server.step_s(num_layers, [cut])
        if predicted > 0 and seconds > 0:
            self.server_scale.update(seconds / predicted)

    def server(self) -> ServerEstimate:
        scale = self.server_scale.value or 1.0
        return ServerEstimate(block_s=self.base_server.block_s * scale, head_s=self.base_server.head_s * scale)

    def device(self, name: str) -> DeviceEstimate | None:
        d = self._devices.get(name)
        if d is None or d.block.value is None:
            return None
        p = d.profile
        measured = MemoryFigures.from_profile(p)
        if measured is not None:  # the device's own figures at the job's shape
            max_blocks = measured.blocks_that_fit(head=self.round_trips == 2)
        else:  # an estimate from the model's shape and what the device says it can use
            usable = float(p.get("usable_mb") or p.get("memory_available_mb") or math.inf)
            max_blocks = blocks_that_fit(usable, self.block_mb)
        rtt_s = float(p.get("rtt_ms", 0.0)) / 1000 * self.round_trips
        uplink, downlink = self._link(
            d, float(p.get("uplink_mbps", math.inf)) * 1e6, float(p.get("downlink_mbps", math.inf)) * 1e6, rtt_s
        )
        return DeviceEstimate(
            name=name,
            block_s=d.block.value,
            fixed_s=d.fixed.value or 0.0,
            up_bytes=d.up.value or self.step_bytes[0],
            down_bytes=d.down.value or self.step_bytes[1],
            uplink_bps=uplink,
            downlink_bps=downlink,
            rtt_s=rtt_s,
            max_blocks=max_blocks,
            accuracy=d.accuracy,
            adapter_block_bytes=self.adapter_block_bytes,
            steps=self.local_steps,
            tail_blocks=None if self.tail_of is None else self.tail_of(name),
        )

    @staticmethod
    def _link(d: _Device, up_bps: float, down_bps: float, rtt_s: float) -> tuple[float, float]:
        """(uplink, downlink) in bit/s: the profile's, or where the timed uploads were slower, the measured
        uplink and the profile's downlink slowed in the same proportion (the measured rate without one)."""
        seconds, nbytes = d.upload.value, d.up.value
        if not seconds or not nbytes:
            return up_bps, down_bps
        measured = nbytes * 8 / max(seconds - rtt_s / 2, 1e-9)
        if measured >= up_bps * 0.9:  # within the profile's figure: keep it (timing noise, virtual links)
            return up_bps, down_bps
        if not math.isfinite(down_bps):
            return measured, measured
        return measured, down_bps * measured / up_bps if math.isfinite(up_bps) else down_bps


def block_memory_mb(config: PretrainedConfig, batch_size: int, max_length: int) -> float:
    """Memory one client block needs on a device: its fp32 weights and a step's activations."""
    return (block_params(config) * 4 + batch_size * max_length * int(config.hidden_size) * 64) / 2**20


def blocks_that_fit(usable_mb: float, block_mb: float) -> int:
    """The most client blocks a device holds: half its usable memory (the rest is the runtime, data and batch)."""
    return max(1, int(usable_mb * 0.5 / block_mb)) if math.isfinite(usable_mb) else 1 << 30


_BLOCK = re.compile(r"\.(\d+)\.")


def adapter_block_bytes(parameters: Mapping[str, Any]) -> float:
    """Mean bytes of one block's adapters on the wire (fp32), from a segment's LoRA parameters by name."""
    blocks: dict[str, int] = {}
    for name, tensor in parameters.items():
        match = _BLOCK.search(name)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), 0) + int(tensor.numel())
    return 4.0 * sum(blocks.values()) / len(blocks) if blocks else 0.0
