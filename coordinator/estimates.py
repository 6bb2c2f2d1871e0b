"""Latency estimates the controller decides from: EWMA-smoothed device and server costs.

Devices report, with every adapter upload, their mean per-step timings: ``block_s`` (forward plus
backward per block), bytes up and down, and in the U split ``head_s`` (the head and loss on the device). Their link comes from their join profile when they know it
(an emulated device does), and is taken as free otherwise. The server's cost is calibrated once
(one forward/backward from the shallowest and from the deepest cut gives the per-block and the
head cost) and then scaled, round by round, by how its measured time per device batch compares
with the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .controller import DeviceEstimate, ServerEstimate


@dataclass
class Ewma:
    weight: float  # of the newest value
    value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.weight * x + (1 - self.weight) * self.value
        return self.value


@dataclass
class _Device:
    block: Ewma
    up: Ewma
    down: Ewma
    fixed: Ewma  # the device's per-step cost that does not depend on its blocks (the U split's head)
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
    ) -> None:
        """``server`` is the server's calibration; the estimates see it, and every later measurement of it,
        ``server_speedup`` times faster (an emulated study's stand-in for a faster server; 1 in real jobs).
        ``round_trips``: the link round trips of a step (2 in the U split)."""
        self.weight = weight
        self.round_trips = round_trips
        self.server_speedup = server_speedup
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
        w = self.weight
        return self._devices.setdefault(name, _Device(Ewma(w), Ewma(w), Ewma(w), Ewma(w)))

    def observe_server(self, num_layers: int, cut: int, seconds: float) -> None:
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
        usable = float(p.get("usable_mb") or p.get("memory_available_mb") or math.inf)
        return DeviceEstimate(
            name=name,
            block_s=d.block.value,
            fixed_s=d.fixed.value or 0.0,
            up_bytes=d.up.value or 0.0,
            down_bytes=d.down.value or 0.0,
            uplink_bps=float(p.get("uplink_mbps", math.inf)) * 1e6,
            downlink_bps=float(p.get("downlink_mbps", math.inf)) * 1e6,
            rtt_s=float(p.get("rtt_ms", 0.0)) / 1000 * self.round_trips,
            # Half the usable memory for the client blocks: the rest is the runtime, data and batch.
            max_blocks=max(1, int(usable * 0.5 / self.block_mb)) if math.isfinite(usable) else 1 << 30,
            accuracy=d.accuracy,
        )
