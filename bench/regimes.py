"""Where adaptation pays: every cut policy on several regimes, on the simulated clock, against honest baselines.

For each scenario (:mod:`.scenario`: a fleet, a server, events during the run) the same rounds run
under every policy and are timed event by event on the simulated clock (:mod:`.clock`). The model is the
study's small base or any other (``scripts/regimes.py --model``; :mod:`.regimes_model`): its blocks' and
head's FLOPs, hidden size, memory per block, adapters and number of blocks (the cuts tried) set the costs.
The server's rates are the scenario's (a profile or TFLOP/s), never this machine's, so a run gives the
same table to the last digit on any machine (``--calibrate`` measures this machine, for comparison only).

* ``fixed-c`` for every cut ``c``: one cut for all devices (capped by each device's memory), and
  **best fixed**, the one of them that finished soonest (a choice made in hindsight);
* ``splitft`` (and ``latency``): the product's own controller (:class:`~splitft.coordinator.controller.Controller`)
  fed by the product's estimator (:class:`~splitft.coordinator.estimates.FleetEstimates`) with what the devices
  would report after each round: their measured per-block time, bytes and upload time, their join profile
  and its one-block benchmark (round 1 is planned from those, as a job with ``plan_first_round`` is);
* **oracle**: it knows every device's true speed and link each round (events included, the moment they
  happen) and takes the cuts that minimise the controller's step model exactly
  (:func:`~splitft.coordinator.controller.latency_cuts`) and, separately, the best single cut for all,
  then improves both on the simulated clock itself, one device at a time trying every cut, while any
  change shortens the round, and keeps the better. Checked by brute force on three devices: optimal in
  the two-part split; in the U split it can stop short of the optimum (0.3% at server x3), since a
  better plan may need two devices' cuts to move at once.

Every policy trains the same adapters: the split is exact (a test: federated split equals centralised)
and the LoRA rank is the same at every block here (``r_cut = r``), so a policy reaches any target
perplexity after the same number of rounds, and time to target is time to that round. The table reports
the time of the whole run (all its rounds); the per-round step times are in the JSONL and the plots.

What the simulation leaves out, and a real run has: wall-clock noise in the measurements (the estimates
here are exact but late: they see a round's conditions after it ran), the time a device takes to rebuild
its segment when its cut moves, and batch lengths that vary from step to step (every step here is
``batch x length`` tokens).

The tables and plots of the report are in :mod:`splitft.bench.regimes_report`, the model in
:mod:`splitft.bench.regimes_model`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from splitft.bench.clock import CostModel, Device, Server, SplitParticipant, server_label, split_round
from splitft.bench.regimes_model import adapted_shapes, base_config
from splitft.bench.scenario import Scenario
from splitft.bench.study.methods import split_step
from splitft.coordinator.controller import (
    Controller,
    ControllerSettings,
    DeviceEstimate,
    ServerEstimate,
    latency_cuts,
    steady_step_s,
)
from splitft.coordinator.estimates import CHANGE_RATIO, FleetEstimates, block_memory_mb, blocks_that_fit
from splitft.shared.model.loading import block_flops, head_flops
from splitft.shared.profiles import DeviceProfile


@dataclass(frozen=True)
class RegimeSettings:
    batch: int = 4  # sequences per device per step
    length: int = 192  # tokens per sequence (GSM8K's median is about 187 with the base's tokenizer)
    local_steps: int = 4
    wire_bytes: int = 2  # fp16 activations and gradients on the wire
    r: int = 16  # LoRA rank of every block (adapter bytes per round)
    first_cut: int = 2  # every device's round-1 cut (the job's configured cut)
    ewma: float = 0.3  # the job defaults of the estimator and the controller
    hysteresis: float = 0.1
    settle_margin: float = 0.1  # "settled": round time within this share of the oracle's
    split: str = "two-part"  # or "u": the devices also hold the norm and the LM head (tail 0, the job default)
    target_share: float = 0.5  # the share of a batch's tokens that are targets (the head runs on those only)
    # The controller as it was before the regimes study (for its before/after table): no adapter exchange in
    # the step model, links from the profiles only, every measurement smoothed, round 1 at the configured cut.
    controller_before: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("two-part", "u"):
            raise ValueError(f"split must be two-part or u, got {self.split!r}")


# --------------------------------------------------------------------------- the fleet during a run


@dataclass
class LiveDevice:
    """A device as it really is in a round (the scenario's events applied)."""

    name: str
    profile: DeviceProfile
    compute: float = 1.0
    link: tuple[float, float, float] | None = None  # (up Mbit/s, down Mbit/s, RTT ms); None: the profile's

    def clock(self) -> Device:
        p = self.profile
        up, down, rtt = self.link or (p.uplink_mbps, p.downlink_mbps, p.rtt_ms)
        return Device(self.name, p.throughput_gflops * 1e9 * self.compute, up * 1e6, down * 1e6, rtt / 1000)


def fleet_at(scenario: Scenario, round_: int) -> list[LiveDevice]:
    """The devices present in ``round_`` and their state, all events up to it applied."""
    fleet = {name: LiveDevice(name, profile) for name, profile in scenario.devices}
    for event in scenario.events:
        if event.round > round_:
            break
        if event.action == "join":
            assert event.profile is not None
            fleet[event.device] = LiveDevice(event.device, event.profile)
        elif event.action == "leave":
            fleet.pop(event.device, None)
        elif event.action == "throttle":
            fleet[event.device].compute = event.compute
        else:
            fleet[event.device].link = event.link
    return list(fleet.values())


# --------------------------------------------------------------------------- one round on the clock


@dataclass(frozen=True)
class Costs:
    """One step's costs in the simulation: the model, the server, the shapes and the bytes."""

    model: CostModel  # the model's shape and the server's rates (the estimator's calibration too)
    settings: RegimeSettings

    @property
    def layers(self) -> int:
        return self.model.layers

    @property
    def hidden(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def u(self) -> bool:
        return self.settings.split == "u"

    @property
    def targets(self) -> int:
        s = self.settings
        return max(1, int(s.batch * s.length * s.target_share))

    @property
    def act_bytes(self) -> float:
        """Up per step: the activations and the labels (int64) in the two-part split; in the U split the
        activations at the cut and the gradient at the tail."""
        s = self.settings
        tensor = s.batch * s.length * self.hidden * s.wire_bytes
        return 2 * tensor if self.u else tensor + 8 * s.batch * s.length

    @property
    def grad_bytes(self) -> float:
        """Down per step: the gradient at the cut (and in the U split the activations at the tail)."""
        s = self.settings
        return s.batch * s.length * self.hidden * s.wire_bytes * (2 if self.u else 1)

    def head_s(self, device: Device) -> float:
        """U split: the device's norm, head and loss, forward and backward, on the targets."""
        return 2 * head_flops(self.model.config, 1, self.targets) / device.flops_per_s if self.u else 0.0

    def server_batch_s(self, cut: int) -> float:
        """The server's work on one device batch (forward and backward)."""
        s = self.settings
        if self.u:
            return 2 * self.model.server_middle_s(cut, 0, s.batch, s.length)
        return self.model.server_batch_s(cut, s.batch, s.length, head_tokens=self.targets)

    def adapter_bytes(self, cut: int) -> float:
        """A client segment's adapters (fp32), each way: r (in + out) per adapted matrix of a block."""
        return cut * self.settings.r * sum(i + o for i, o in adapted_shapes(self.model.config)) * 4

    def block_s(self, device: Device, tokens: int | None = None) -> float:
        """A device's forward + backward of one block for one step (of ``tokens`` tokens, default the job's)."""
        s = self.settings
        flops = block_flops(self.model.config, s.batch, s.length)
        if tokens is not None:
            flops *= tokens / (s.batch * s.length)
        return 2 * flops / device.flops_per_s

    def server_estimate(self, rates: Server) -> ServerEstimate:
        s = self.settings
        return ServerEstimate(
            block_s=2 * block_flops(self.model.config, s.batch, s.length) / rates.block_flops_per_s,
            head_s=0.0 if self.u else 2 * head_flops(self.model.config, 1, self.targets) / rates.head_flops_per_s,
        )

    def block_mb(self) -> float:
        """Memory of one client block on a device (the runtime's own figure: weights and activations)."""
        return block_memory_mb(self.model.config, self.settings.batch, self.settings.length)

    def max_blocks(self, profile: DeviceProfile) -> int:
        return blocks_that_fit(profile.usable_mb, self.block_mb())

    def truth(self, device: LiveDevice) -> DeviceEstimate:
        """What an all-knowing controller would know of a device this round."""
        clock = device.clock()
        return DeviceEstimate(
            name=device.name,
            block_s=self.block_s(clock),
            fixed_s=self.head_s(clock),
            up_bytes=self.act_bytes,
            down_bytes=self.grad_bytes,
            uplink_bps=clock.uplink_bps,
            downlink_bps=clock.downlink_bps,
            rtt_s=clock.rtt_s * (2 if self.u else 1),
            max_blocks=self.max_blocks(device.profile),
            adapter_block_bytes=self.adapter_bytes(1),
            steps=self.settings.local_steps,
            tail_blocks=0 if self.u else None,  # the U split's device holds the head alone above the server
        )

    def simulate(self, fleet: Sequence[LiveDevice], cuts: Mapping[str, int]) -> tuple[float, float]:
        """(round seconds, mean step seconds) of one round at ``cuts`` on the simulated clock."""
        s = self.settings
        participants = []
        for d in fleet:
            clock, cut = d.clock(), cuts[d.name]
            tail = 0 if self.u else None
            step = split_step(
                self.model, clock, cut, tail, s.batch, s.length, self.targets, self.act_bytes, self.grad_bytes
            )
            adapters = self.adapter_bytes(cut)
            participants.append(
                SplitParticipant(d.name, clock.down_s(adapters), [step] * s.local_steps, clock.up_s(adapters))
            )
        timing = split_round(participants)
        return timing.seconds, timing.mean_step_s


# --------------------------------------------------------------------------- policies


def oracle_cuts(costs: Costs, fleet: Sequence[LiveDevice]) -> dict[str, int]:
    """The best cuts found on the clock from two starts, the step model's exact optimum on the true figures and
    the best single cut for all: from each, every device in turn takes its best cut with the others held,
    until no change shortens the round."""
    truth = [costs.truth(d) for d in fleet]
    caps = {d.name: min(costs.layers - 1, d.max_blocks) for d in truth}
    server = costs.server_estimate(costs.model.server)
    uniform = [{d.name: min(c, caps[d.name]) for d in truth} for c in range(1, costs.layers)]
    starts = [
        latency_cuts(truth, server, costs.layers, 1, costs.layers - 1),
        min(uniform, key=lambda cuts: costs.simulate(fleet, cuts)[0]),
    ]
    found = [_descend(costs, fleet, cuts, caps) for cuts in starts]
    return min(found, key=lambda pair: pair[0])[1]


def _descend(
    costs: Costs, fleet: Sequence[LiveDevice], cuts: dict[str, int], caps: Mapping[str, int]
) -> tuple[float, dict[str, int]]:
    best = costs.simulate(fleet, cuts)[0]
    improved = True
    while improved:
        improved = False
        for name, cap in caps.items():
            for cut in range(1, cap + 1):
                if cut == cuts[name]:
                    continue
                trial = {**cuts, name: cut}
                seconds = costs.simulate(fleet, trial)[0]
                if seconds < best * (1 - 1e-9):
                    cuts, best, improved = trial, seconds, True
    return best, cuts


@dataclass
class ControlledPolicy:
    """The product's controller and estimator, fed as a real coordinator feeds them."""

    costs: Costs
    policy: str
    controller: Controller = field(init=False)
    estimates: FleetEstimates = field(init=False)
    plan_first_round: bool = field(init=False)
    first: bool = True

    def __post_init__(self) -> None:
        c = self.costs
        before = c.settings.controller_before
        self.plan_first_round = not before  # the job setting: round 1 from the join measurements, or the cut
        settings = ControllerSettings(
            policy=self.policy, num_layers=c.layers, fixed_cut=c.settings.first_cut, hysteresis=c.settings.hysteresis
        )
        self.controller = Controller(settings)
        # The estimator's calibration is the server's own rates (a real job calibrates the server it runs on).
        calibration = c.server_estimate(c.model.server)
        self.estimates = FleetEstimates(
            c.settings.ewma, calibration, c.block_mb(), round_trips=2 if c.u else 1,
            adapter_block_bytes=0.0 if before else c.adapter_bytes(1), local_steps=c.settings.local_steps,
            step_bytes=(0.0, 0.0) if before else (c.act_bytes, c.grad_bytes),
            change_ratio=math.inf if before else CHANGE_RATIO, tail_of=(lambda _: 0) if c.u else None,
        )  # fmt: skip

    def join_profile(self, device: LiveDevice) -> dict[str, Any]:
        """What an agent sends when it joins: its class's link and memory, and one block timed at 4 x 128."""
        p = device.profile
        return {
            "class": p.name, "uplink_mbps": p.uplink_mbps, "downlink_mbps": p.downlink_mbps, "rtt_ms": p.rtt_ms,
            "usable_mb": p.usable_mb, "block_s": self.costs.block_s(device.clock(), tokens=4 * 128), "block_tokens": 512,
        }  # fmt: skip

    def decide(self, fleet: Sequence[LiveDevice]) -> tuple[dict[str, int], tuple[float, float] | None]:
        """(cuts, None or the predicted (steady step, step with the exchange's share) seconds) for this round."""
        s = self.costs.settings
        if self.first and not self.plan_first_round:
            self.first = False
            return {d.name: min(s.first_cut, self.costs.max_blocks(d.profile)) for d in fleet}, None
        for d in fleet:
            self.estimates.observe_join(d.name, self.join_profile(d), s.batch * s.length)
        devices = [d for d in (self.estimates.device(d.name) for d in fleet) if d is not None]
        server = self.estimates.server()
        decision = self.controller.decide(devices, server)
        # The controller's step time counts each step's share of the round's adapter exchange; the clock's step
        # time is the steady step between gradients, which the controller's queue also predicts.
        steady = steady_step_s(devices, server, self.costs.layers, decision.cuts)
        return decision.cuts, (steady, decision.queued_s)

    def observe(self, fleet: Sequence[LiveDevice], cuts: Mapping[str, int]) -> None:
        """The round's reports: each device's measured block time, bytes and upload time; the server's times."""
        c = self.costs
        for d in fleet:
            clock = d.clock()
            uploads = 2 * clock.up_s(c.act_bytes / 2) if c.u else clock.up_s(c.act_bytes)
            timings = {
                "block_s": c.block_s(clock),
                "head_s": c.head_s(clock),
                "bytes_up": c.act_bytes,
                "bytes_down": c.grad_bytes,
                "upload_s": 0.0 if c.settings.controller_before else uploads,
            }
            self.estimates.observe_device(d.name, timings, self.join_profile(d), None)
            self.estimates.observe_server(c.layers, cuts[d.name], c.server_batch_s(cuts[d.name]))


def run_policy(costs: Costs, scenario: Scenario, policy: str) -> list[dict[str, Any]]:
    """One run of ``scenario`` under ``policy`` (``fixed-C``, ``oracle``, ``splitft`` or ``latency``): a row per round."""
    controlled = ControlledPolicy(costs, policy) if policy in ("splitft", "latency") else None
    rows, elapsed = [], 0.0
    planned: dict[tuple[Any, ...], dict[str, int]] = {}  # the oracle's cuts by fleet state (same state, same cuts)
    for round_ in range(1, scenario.rounds + 1):
        fleet = fleet_at(scenario, round_)
        predicted: tuple[float, float] | None = None
        if controlled is not None:
            cuts, predicted = controlled.decide(fleet)
        elif policy == "oracle":
            state = tuple((d.name, d.profile.name, d.compute, d.link) for d in fleet)
            if state not in planned:
                planned[state] = oracle_cuts(costs, fleet)
            cuts = planned[state]
        else:
            cut = int(policy.removeprefix("fixed-"))
            cuts = {d.name: min(cut, costs.max_blocks(d.profile)) for d in fleet}
        seconds, step_s = costs.simulate(fleet, cuts)
        if controlled is not None:
            controlled.observe(fleet, cuts)
        elapsed += seconds
        rows.append(
            {
                "round": round_,
                "cuts": dict(cuts),
                "round_s": round(seconds, 5),
                "step_s": round(step_s, 5),
                "predicted_step_s": None if predicted is None else round(predicted[0], 5),
                "predicted_round_s": None if predicted is None else round(predicted[1] * costs.settings.local_steps, 5),
                "elapsed_s": round(elapsed, 4),
                "events": [e.describe() for e in scenario.events_at(round_)],
            }
        )
    return rows


# --------------------------------------------------------------------------- a regime's results


def fixed_policies(costs: Costs) -> list[str]:
    return [f"fixed-{c}" for c in range(1, costs.layers)]


def run_regime(costs: Costs, scenario: Scenario) -> dict[str, Any]:
    runs = {p: run_policy(costs, scenario, p) for p in [*fixed_policies(costs), "latency", "splitft", "oracle"]}
    total = {p: rows[-1]["elapsed_s"] for p, rows in runs.items()}
    best_fixed = min(fixed_policies(costs), key=lambda p: total[p])
    split, oracle = runs["splitft"], runs["oracle"]
    step_errors = _errors(split, "predicted_step_s", "step_s")
    round_errors = _errors(split, "predicted_round_s", "round_s")
    return {
        "scenario": scenario.name,
        "split": costs.settings.split,
        "server": scenario.server_spec,  # as the scenario (or --server) names it
        "server_tflops": server_label(costs.model.server),  # blocks,head
        "layers": costs.layers,
        "devices": len(scenario.devices),
        "rounds": scenario.rounds,
        "events": [{"round": e.round, "event": e.describe()} for e in scenario.events],
        "total_s": total,
        "best_fixed": best_fixed,
        "splitft_vs_best_fixed": total[best_fixed] / total["splitft"],  # > 1: splitft sooner
        "splitft_over_oracle": total["splitft"] / total["oracle"],  # >= 1: distance to the oracle
        "best_fixed_over_oracle": total[best_fixed] / total["oracle"],
        "regret_s": total["splitft"] - total["oracle"],
        # The rounds where an event happened are ones no controller that learns from reports can foresee.
        "splitft_over_oracle_between_events": _between_events(scenario, split, oracle),
        "step_error_median": statistics.median(step_errors) if step_errors else None,
        "step_error_worst": max(step_errors) if step_errors else None,
        "round_error_median": statistics.median(round_errors) if round_errors else None,
        "round_error_worst": max(round_errors) if round_errors else None,
        "resettle_rounds": resettle_rounds(scenario, split, oracle, costs.settings.settle_margin),
        "runs": runs,
    }


def _between_events(
    scenario: Scenario, split: Sequence[Mapping[str, Any]], oracle: Sequence[Mapping[str, Any]]
) -> float | None:
    """splitft's time over the oracle's on the rounds without an event (None when every round has one)."""
    quiet = [i for i, r in enumerate(split) if not r["events"]]
    if not quiet or not scenario.events:
        return None
    return sum(split[i]["round_s"] for i in quiet) / sum(oracle[i]["round_s"] for i in quiet)


def _errors(rows: Sequence[Mapping[str, Any]], predicted: str, simulated: str) -> list[float]:
    """|predicted - simulated| / simulated of every round the controller predicted."""
    return [abs(r[predicted] - r[simulated]) / r[simulated] for r in rows if r[predicted] is not None and r[simulated]]


def resettle_rounds(
    scenario: Scenario, split: Sequence[Mapping[str, Any]], oracle: Sequence[Mapping[str, Any]], margin: float
) -> list[dict[str, Any]]:
    """For each event round: how many rounds after it splitft's round time came back within ``margin`` of the
    oracle's and stayed there until the next event (0: at the event's own round; None: never)."""
    rounds = sorted({e.round for e in scenario.events})
    out = []
    for i, start in enumerate(rounds):
        end = rounds[i + 1] if i + 1 < len(rounds) else scenario.rounds + 1
        within = [split[r - 1]["round_s"] <= oracle[r - 1]["round_s"] * (1 + margin) for r in range(start, end)]
        settled = next((k for k in range(len(within)) if all(within[k:])), None)
        names = "; ".join(e.describe() for e in scenario.events_at(start))
        out.append({"round": start, "events": names, "rounds_to_settle": settled, "rounds_observed": end - start})
    return out


def make_costs(settings: RegimeSettings, server: Server, config: PretrainedConfig | None = None) -> Costs:
    """The costs of ``config``'s model (default: the study's base) against ``server``."""
    return Costs(CostModel(config if config is not None else base_config(), server), settings)
