"""The cut-layer controller on synthetic fleets: exact where the optimum is known, stable under noise."""

from __future__ import annotations

import itertools
import random

import pytest

from splitft.coordinator.controller import (
    Controller,
    ControllerSettings,
    DeviceEstimate,
    ServerEstimate,
    ideal_bound,
    latency_cuts,
)
from splitft.shared.errors import ConfigError

L = 12


def fleet() -> list[DeviceEstimate]:
    """A slow Jetson Nano-like device, a mid one, a fast laptop-like one (same link)."""
    link = {"up_bytes": 1e6, "down_bytes": 1e6, "uplink_bps": 100e6, "downlink_bps": 100e6, "rtt_s": 0.005}
    return [
        DeviceEstimate("nano", block_s=0.20, fixed_s=0.05, **link),
        DeviceEstimate("orin", block_s=0.06, fixed_s=0.02, **link),
        DeviceEstimate("laptop", block_s=0.03, fixed_s=0.01, **link),
    ]


MODEST_SERVER = ServerEstimate(block_s=0.02, head_s=0.05)  # the server's shared load matters


def makespan(devices: list[DeviceEstimate], server: ServerEstimate, cuts: dict[str, int]) -> float:
    """Written out again from the model, independently of the controller's code."""
    trips = [d.step_s(cuts[d.name]) + (L - cuts[d.name]) * server.block_s + server.head_s for d in devices]
    return max(max(trips), sum((L - c) * server.block_s + server.head_s for c in cuts.values()))


def brute_force(devices: list[DeviceEstimate], server: ServerEstimate, c_min: int, c_max: int) -> float:
    ranges = [range(c_min, min(c_max, d.max_blocks) + 1) for d in devices]
    return min(
        makespan(devices, server, {d.name: c for d, c in zip(devices, cuts, strict=True)})
        for cuts in itertools.product(*ranges)
    )


def test_faster_device_gets_the_deeper_cut() -> None:
    cuts = latency_cuts(fleet(), MODEST_SERVER, L, 1, L - 1)
    assert cuts["laptop"] > cuts["orin"] > cuts["nano"], cuts


@pytest.mark.parametrize("seed", range(20))
def test_latency_cuts_are_optimal_on_random_fleets(seed: int) -> None:
    rng = random.Random(seed)
    devices = [
        DeviceEstimate(
            f"d{i}",
            block_s=rng.uniform(0.005, 0.3),
            fixed_s=rng.uniform(0, 0.05),
            up_bytes=5e5,
            down_bytes=5e5,
            uplink_bps=rng.choice([20e6, 100e6, 1e9]),
            downlink_bps=100e6,
            rtt_s=rng.uniform(0, 0.05),
            max_blocks=rng.choice([3, 6, 11]),
            adapter_block_bytes=rng.choice([0.0, 2.6e5]),  # a block's adapters, each way once a round ...
            steps=rng.choice([1, 4]),  # ... of this many steps
        )
        for i in range(rng.randint(1, 4))
    ]
    server = ServerEstimate(block_s=rng.uniform(0.001, 0.05), head_s=rng.uniform(0, 0.1))
    cuts = latency_cuts(devices, server, L, 1, L - 1)
    assert makespan(devices, server, cuts) == pytest.approx(brute_force(devices, server, 1, L - 1))
    assert all(1 <= cuts[d.name] <= d.max_blocks for d in devices)
    # ... and never below the balanced (fractional) bound
    ideal = ideal_bound(devices, server, L, 1, L - 1)
    assert makespan(devices, server, cuts) >= ideal * (1 - 1e-9)


def test_within_ten_percent_of_the_ideal_on_a_balanced_fleet() -> None:
    """Identical devices whose balanced cut is a whole block: the ideal is reachable, and reached."""
    devices = [DeviceEstimate(f"d{i}", block_s=0.03) for i in range(4)]
    # round trip 0.03 c + 0.01 (12 - c) equals the server's 4 x 0.01 (12 - c) at c = 6
    server = ServerEstimate(block_s=0.01)
    decision = Controller(ControllerSettings(policy="latency")).decide(devices, server)
    assert set(decision.cuts.values()) == {6}
    assert decision.ratio == pytest.approx(1.0)
    many = [DeviceEstimate(f"d{i}", block_s=0.02 + 0.01 * (i % 3)) for i in range(9)]
    decision = Controller(ControllerSettings(policy="latency")).decide(many, ServerEstimate(block_s=0.004))
    assert decision.ratio <= 1.10


def test_memory_bound_device_is_capped() -> None:
    devices = [*fleet()[:2], DeviceEstimate("laptop", block_s=0.03, fixed_s=0.01, max_blocks=2)]
    for policy in ("fixed", "latency", "splitft"):
        decision = Controller(ControllerSettings(policy=policy, fixed_cut=5)).decide(devices, MODEST_SERVER)
        assert decision.cuts["laptop"] <= 2, policy
    with pytest.raises(ConfigError, match="below c_min"):
        latency_cuts([DeviceEstimate("tiny", block_s=0.1, max_blocks=1)], MODEST_SERVER, L, 2, L - 1)


def test_a_far_faster_server_takes_everything_beyond_c_min() -> None:
    cuts = latency_cuts(fleet(), ServerEstimate(block_s=1e-4), L, 2, L - 1)
    assert set(cuts.values()) == {2}  # the privacy floor


def test_paper_rule_moves_cuts_by_accuracy() -> None:
    devices = [
        DeviceEstimate("a", block_s=0.1, accuracy=0.30),
        DeviceEstimate("b", block_s=0.1, accuracy=0.20),
        DeviceEstimate("c", block_s=0.1, accuracy=0.25),
    ]
    decision = Controller(ControllerSettings(policy="paper", fixed_cut=4)).decide(devices, MODEST_SERVER)
    assert decision.cuts["a"] > 4 > decision.cuts["b"] and decision.cuts["c"] == 4


def test_on_a_slow_link_a_deep_cut_costs_its_adapters() -> None:
    """A fast device on a 2 Mbit/s link: each block it takes adds its adapters to the round's exchange."""
    server = ServerEstimate(block_s=0.05, head_s=0.01)  # a modest server: deep cuts pay for compute alone
    slow_link = {"up_bytes": 4e5, "down_bytes": 4e5, "uplink_bps": 2e6, "downlink_bps": 2e6, "rtt_s": 0.08}
    fast = [DeviceEstimate("agx", block_s=0.002, **slow_link), DeviceEstimate("laptop", block_s=0.004, **slow_link)]
    free = latency_cuts(fast, server, L, 1, L - 1)
    assert min(free.values()) == L - 1  # the adapters ignored: the devices take every block they can
    costed = [DeviceEstimate(d.name, d.block_s, adapter_block_bytes=2.6e5, steps=4, **slow_link) for d in fast]
    cuts = latency_cuts(costed, server, L, 1, L - 1)
    assert max(cuts.values()) < L - 1, cuts
    # 2.6e5 bytes each way per block over 2 Mbit/s, a quarter per step: 0.52 s a block, far more than its compute.
    assert costed[0].per_block_s == pytest.approx(0.002 + 2.6e5 * 8 * 2 / 2e6 / 4)
    assert makespan(costed, server, cuts) == pytest.approx(brute_force(costed, server, 1, L - 1))


def test_noisy_reports_do_not_make_cuts_flap() -> None:
    """+/-10% noise on every measurement, 30 rounds, EWMA-smoothed: the splitft policy settles and stays."""
    rng = random.Random(0)
    base = fleet()
    controller = Controller(ControllerSettings(policy="splitft"))
    smoothed = {d.name: d.block_s for d in base}
    server_smoothed = MODEST_SERVER.block_s
    changes = 0
    previous = None
    for _ in range(30):
        for d in base:
            smoothed[d.name] = 0.7 * smoothed[d.name] + 0.3 * d.block_s * rng.uniform(0.9, 1.1)
        server_smoothed = 0.7 * server_smoothed + 0.3 * MODEST_SERVER.block_s * rng.uniform(0.9, 1.1)
        devices = [
            DeviceEstimate(d.name, block_s=smoothed[d.name], fixed_s=d.fixed_s, up_bytes=d.up_bytes,
                           down_bytes=d.down_bytes, uplink_bps=d.uplink_bps, downlink_bps=d.downlink_bps, rtt_s=d.rtt_s)
            for d in base
        ]  # fmt: skip
        cuts = controller.decide(devices, ServerEstimate(block_s=server_smoothed, head_s=MODEST_SERVER.head_s)).cuts
        changes += previous is not None and cuts != previous
        previous = cuts
    assert changes == 0
    # Without hysteresis the same noise does move the cuts: the test can tell the difference.
    jumpy = Controller(ControllerSettings(policy="latency"))
    seen = set()
    for _ in range(30):
        devices = [DeviceEstimate(d.name, block_s=d.block_s * rng.uniform(0.9, 1.1), fixed_s=d.fixed_s) for d in base]
        seen.add(tuple(sorted(jumpy.decide(devices, MODEST_SERVER).cuts.items())))
    assert len(seen) > 1


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="policy"):
        ControllerSettings(policy="magic")
    with pytest.raises(ConfigError, match="c_min"):
        ControllerSettings(c_min=5, c_max=3)
    with pytest.raises(ConfigError, match="gamma"):
        ControllerSettings(gamma=-1)
