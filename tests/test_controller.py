"""The cut-layer controller on synthetic fleets: exact where the optimum is known, stable under noise."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from splitft.bench.clock import SplitParticipant, SplitStep, split_round
from splitft.coordinator.controller import (
    Controller,
    ControllerSettings,
    DeviceEstimate,
    ServerEstimate,
    hand_back,
    ideal_bound,
    latency_cuts,
    queued_step_s,
    refine_cuts,
    steady_step_s,
    turnaround_s,
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


def random_fleet(rng: random.Random, size: int, steps: int = 4) -> tuple[list[DeviceEstimate], ServerEstimate]:
    """Devices of random speeds, links (some at 2 Mbit/s) and memory; adapters of a block exchanged once a round
    of ``steps`` steps, or none."""
    devices = [
        DeviceEstimate(
            f"d{i}",
            block_s=rng.uniform(0.005, 0.3),
            fixed_s=rng.uniform(0, 0.05),
            up_bytes=5e5,
            down_bytes=5e5,
            uplink_bps=rng.choice([2e6, 20e6, 1e9]),
            downlink_bps=rng.choice([2e6, 100e6]),
            rtt_s=rng.uniform(0, 0.08),
            max_blocks=rng.choice([3, 6, 11]),
            adapter_block_bytes=rng.choice([0.0, 2.6e5]),
            steps=steps,
        )
        for i in range(size)
    ]
    return devices, ServerEstimate(block_s=rng.uniform(0.005, 0.1), head_s=rng.uniform(0, 0.1))


@pytest.mark.parametrize("seed", range(20))
def test_latency_cuts_are_optimal_on_random_fleets(seed: int) -> None:
    rng = random.Random(seed)
    devices, server = random_fleet(rng, rng.randint(1, 4), steps=rng.choice([1, 4]))
    cuts = latency_cuts(devices, server, L, 1, L - 1)
    assert makespan(devices, server, cuts) == pytest.approx(brute_force(devices, server, 1, L - 1))
    assert all(1 <= cuts[d.name] <= d.max_blocks for d in devices)
    # ... and never below the balanced (fractional) bound
    ideal = ideal_bound(devices, server, L, 1, L - 1)
    assert makespan(devices, server, cuts) >= ideal * (1 - 1e-9)


def scanned_latency_cuts(devices: list[DeviceEstimate], server: ServerEstimate, c_max: int) -> dict[str, int]:
    """M's optimum by trying every candidate step time T in turn (each device's round trips) until the server's
    total fits, as latency_cuts did before it bisected, then the same hand-back of ties."""
    caps = {d.name: min(c_max, d.max_blocks) for d in devices}
    trips = sorted({turnaround_s(d, server, L, c) for d in devices for c in range(1, caps[d.name] + 1)})
    best: tuple[float, dict[str, int]] | None = None
    for limit in trips:
        cuts = {}
        for d in devices:
            fitting = [c for c in range(1, caps[d.name] + 1) if turnaround_s(d, server, L, c) <= limit + 1e-12]
            if fitting:
                cuts[d.name] = max(fitting)
        if len(cuts) < len(devices):
            continue
        span = makespan(devices, server, cuts)
        if best is None or span < best[0] - 1e-12:
            best = (span, cuts)
        if server.step_s(L, list(cuts.values())) <= limit:
            break
    assert best is not None
    return hand_back(devices, server, L, 1, *best)


@pytest.mark.parametrize("seed", range(30))
def test_the_bisection_finds_what_trying_every_step_time_finds(seed: int) -> None:
    """latency_cuts bisects the candidate step times (the server's total only falls as they grow): the same cuts
    as trying each in turn, on fleets of up to 40 devices, fast servers and slow."""
    rng = random.Random(seed)
    devices, server = random_fleet(rng, rng.randint(1, 40), steps=rng.choice([1, 4]))
    if seed % 3 == 0:  # a server far faster than the devices: every T fits, the first is the optimum
        server = ServerEstimate(block_s=server.block_s / 100, head_s=server.head_s / 100)
    assert latency_cuts(devices, server, L, 1, L - 1) == scanned_latency_cuts(devices, server, L - 1)


def test_within_ten_percent_of_the_ideal_on_a_balanced_fleet() -> None:
    """Identical devices whose balanced cut is a whole block: the ideal is reachable, and reached."""
    devices = [DeviceEstimate(f"d{i}", block_s=0.03) for i in range(4)]
    # round trip 0.03 c + 0.01 (12 - c) equals the server's 4 x 0.01 (12 - c) at c = 6
    server = ServerEstimate(block_s=0.01)
    decision = Controller(ControllerSettings(policy="latency")).decide(devices, server)
    assert set(decision.cuts.values()) == {6}
    assert decision.ratio == pytest.approx(1.0)
    many = [DeviceEstimate(f"d{i}", block_s=0.02 + 0.01 * (i % 3)) for i in range(9)]
    server = ServerEstimate(block_s=0.004)
    best_m = latency_cuts(many, server, L, 1, L - 1)
    assert makespan(many, server, best_m) / ideal_bound(many, server, L, 1, L - 1) <= 1.10
    # The policy takes the cuts with the shortest round as served (one step here: the server idles until the
    # first batch is in, so early arrivals pay), which M's optimum is not always.
    decision = Controller(ControllerSettings(policy="latency")).decide(many, server)
    assert decision.queued_s <= queued_step_s(many, server, L, best_m) * (1 + 1e-9)


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


def clock_participant(d: DeviceEstimate, server: ServerEstimate, cut: int) -> SplitParticipant:
    """The same device for the study's event clock, written out from the protocol: adapters down, per step a
    forward pass (a third of the compute) and the activations up, the server's work, the gradient down and the
    backward pass; the adapters up at the end. In the U split (``tail_blocks``) two messages each way: the
    server's forward (a third of its work), the tail's activations down, the tail with the head, the gradient
    up, the server's backward."""
    work = (L - cut) * server.block_s + server.head_s
    adapters = cut * d.adapter_block_bytes * 8
    if d.tail_blocks is None:
        compute = d.fixed_s + cut * d.block_s
        step = SplitStep(
            forward_s=compute / 3,
            up_s=d.up_bytes * 8 / d.uplink_bps + d.rtt_s / 2,
            server_s=work,
            down_s=d.down_bytes * 8 / d.downlink_bps + d.rtt_s / 2,
            backward_s=2 * compute / 3,
        )
    else:
        tail_blocks = min(d.tail_blocks, cut - 1)  # a U-split device keeps a block below the server
        front = (cut - tail_blocks) * d.block_s
        up, down = d.up_bytes * 4 / d.uplink_bps + d.rtt_s / 4, d.down_bytes * 4 / d.downlink_bps + d.rtt_s / 4
        tail = d.fixed_s + tail_blocks * d.block_s
        step = SplitStep(front / 3, up, work / 3, down, 2 * front / 3, tail=(down, tail, up, 2 * work / 3))
    return SplitParticipant(
        d.name, adapters / d.downlink_bps + d.rtt_s / 2, [step] * d.steps, adapters / d.uplink_bps + d.rtt_s / 2
    )


@pytest.mark.parametrize("split", ["two-part", "u"])
@pytest.mark.parametrize("seed", range(12))
def test_queued_step_is_the_event_clock_of_the_same_round(seed: int, split: str) -> None:
    """The controller's queue replays what the study's event clock replays (one piece of server work at a time,
    in arrival order, a barrier between steps, the adapters before the first step and after the last; in the U
    split the server's forward and backward of a batch queued apart, the device's tail between them): the same
    round and steps, and never below M."""
    rng = random.Random(seed)
    devices, server = random_fleet(rng, rng.randint(1, 6), steps=rng.choice([1, 3, 8]))
    if split == "u":
        devices = [dataclasses.replace(d, tail_blocks=rng.choice([0, 1, 2])) for d in devices]
    cuts = {d.name: rng.randint(1, d.max_blocks) for d in devices}
    timing = split_round([clock_participant(d, server, cuts[d.name]) for d in devices])
    steps = devices[0].steps
    assert queued_step_s(devices, server, L, cuts) == pytest.approx(timing.seconds / steps, rel=1e-9)
    assert steady_step_s(devices, server, L, cuts) == pytest.approx(timing.mean_step_s, rel=1e-9)
    assert queued_step_s(devices, server, L, cuts) >= makespan(devices, server, cuts) * (1 - 1e-9)


def test_the_queue_is_m_where_nobody_waits() -> None:
    """One device: the round is its steps of M back to back, and the adapter messages' latency. Identical
    devices at their balanced cut: between steps, the server is never idle and nobody waits, the step is M."""
    one = [DeviceEstimate("d", block_s=0.05, fixed_s=0.01, rtt_s=0.04, steps=4)]
    m = makespan(one, MODEST_SERVER, {"d": 4})
    assert queued_step_s(one, MODEST_SERVER, L, {"d": 4}) == pytest.approx(m + 0.04 / 4)
    assert steady_step_s(one, MODEST_SERVER, L, {"d": 4}) == pytest.approx(m)
    balanced = [DeviceEstimate(f"d{i}", block_s=0.03, steps=8) for i in range(4)]
    cuts = dict.fromkeys((d.name for d in balanced), 6)
    server = ServerEstimate(block_s=0.01)
    assert steady_step_s(balanced, server, L, cuts) == pytest.approx(makespan(balanced, server, cuts))


def test_refined_cuts_shorten_the_queue_on_slow_links() -> None:
    """Devices on 2 Mbit/s links next to fast ones, a modest server: M's optimum leaves batches queueing
    behind each other; the refinement finds cuts with a shorter queued step, and never a longer one."""
    gains = []
    for seed in range(30):
        devices, server = random_fleet(random.Random(seed), 6)
        start = latency_cuts(devices, server, L, 1, L - 1)
        refined = refine_cuts(devices, server, L, 1, L - 1, start)
        before, after = queued_step_s(devices, server, L, start), queued_step_s(devices, server, L, refined)
        assert after <= before * (1 + 1e-9)
        assert all(1 <= refined[d.name] <= d.max_blocks for d in devices)
        gains.append(before / after)
    assert max(gains) > 1.02, gains  # the queue matters on some of these fleets ...
    best = max(range(30), key=lambda i: gains[i])
    devices, server = random_fleet(random.Random(best), 6)
    start = latency_cuts(devices, server, L, 1, L - 1)
    one_trial = refine_cuts(devices, server, L, 1, L - 1, start, budget=6)  # 6 devices: one trial's replay
    assert sum(one_trial[n] != start[n] for n in start) <= 1
    full = refine_cuts(devices, server, L, 1, L - 1, start)
    assert queued_step_s(devices, server, L, full) < queued_step_s(devices, server, L, one_trial)
    decision = Controller(ControllerSettings(policy="latency")).decide(devices, server)
    assert decision.queued_s == pytest.approx(queued_step_s(devices, server, L, decision.cuts))  # ... and Q is told


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="policy"):
        ControllerSettings(policy="magic")
    with pytest.raises(ConfigError, match="c_min"):
        ControllerSettings(c_min=5, c_max=3)
    with pytest.raises(ConfigError, match="gamma"):
        ControllerSettings(gamma=-1)
