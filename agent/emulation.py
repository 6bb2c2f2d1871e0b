"""Making this machine behave like another device class (a profile in ``firmware_profiles/``).

Compute: each phase of a step (forward, backward) takes at least the time the profile needs for its
floating-point work (``flops / sustained throughput``); when this host is faster, the agent sleeps the
difference. A host slower than the profile cannot be sped up: the agent then runs at host speed and
says so in its log. Link: every message up waits ``bytes * 8 / uplink + rtt / 2`` before it is sent,
every message down ``bytes * 8 / downlink + rtt / 2`` after it arrives.

Virtual emulation (``virtual=True``) waits for none of it: the agent computes at host speed, but
reports the profile's compute time as its own, so that the coordinator's controller plans for the
emulated fleet while the run goes as fast as this host allows. Studies then measure time on a
simulated clock (``splitft.bench.clock``) instead of the wall clock.

The FLOP count of a block (``splitft.shared.model.loading.block_flops``) is the usual estimate for training with frozen base
weights: the forward pass costs ``2 P n`` for the block's ``P`` weights over ``n`` tokens plus
``4 n T C`` for attention over sequences of ``T``; the backward pass computes input gradients only
(the base weights are frozen; LoRA's own are negligible), about as much again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from splitft.shared.model.loading import block_flops, block_params
from splitft.shared.profiles import DeviceProfile

__all__ = ["Emulation", "block_flops", "block_params"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Emulation:
    """Stretches compute and shapes the link to ``profile``; all waits are real sleeps."""

    profile: DeviceProfile
    #: multiplies the profile's throughput: tiny test models on a laptop-class host outrun real
    #: devices' figures, so a demo scales the whole fleet down (0.01) to keep their ratios visible
    scale: float = 1.0
    #: report the profile's times without waiting for them (see the module docstring)
    virtual: bool = False

    def compute_s(self, flops: float) -> float:
        """Seconds the emulated device needs for ``flops``."""
        return self.profile.compute_seconds(flops) / self.scale

    def pad_compute(self, measured_s: float, flops: float) -> float:
        """Sleep until ``flops`` took as long as on the profile; returns the emulated duration."""
        target = self.compute_s(flops)
        if self.virtual:
            return target
        if target > measured_s:
            time.sleep(target - measured_s)
            return target
        if measured_s > 1.2 * target:
            log.debug("this host is slower than %s for this work: running at host speed", self.profile.name)
        return measured_s

    async def wait_link(self, seconds: float) -> None:
        """Hold a message for its emulated transfer time (not in virtual emulation)."""
        if not self.virtual:
            await asyncio.sleep(seconds)

    def uplink_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.profile.uplink_mbps * 1e6) + self.profile.rtt_ms / 2000

    def downlink_s(self, nbytes: int) -> float:
        return nbytes * 8 / (self.profile.downlink_mbps * 1e6) + self.profile.rtt_ms / 2000
