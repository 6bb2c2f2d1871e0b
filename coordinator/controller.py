"""The cut-layer controller: which block each device's segment ends at, revised every round.

The cost model of one global step. A device cannot start its next step before the server has
answered this one, and the server serves one device batch at a time and steps its optimiser once
every batch of the step is in, so a step lasts as long as the longer of the server's total work and
any one device's round trip (its own compute and link, plus the server's work on its batch):

    device i at cut c:   d_i(c) = fixed_i + c * (block_i + adapter_i) + up_i / uplink_i + down_i / downlink_i + rtt_i
    server, one batch:   s(c)   = (L - c) * server_block + server_head
    step time:           M(c)   = max(max_i (d_i(c_i) + s(c_i)), sum_i s(c_i))

``adapter_i`` is a block's share of the round's adapter exchange, per step: the device receives the
global adapters of its blocks and sends its own back once a round, ``c * a`` bytes each way over its
link, spread over the round's ``steps`` (on a slow link a deep cut costs more than its compute).
A deeper cut moves work from the shared server to the device; activation bytes do not depend on
the cut. So when the server is far faster than every device, the latency-optimal cut is ``c_min``
for all: adaptation pays when the server's shared load matters (many devices or a modest server),
when memory or a privacy floor bounds the cuts, and under the paper's performance rule.

Policies (``POLICIES``):

* ``fixed``   one cut for all (the SplitLoRA / SFL baseline), capped by each device's memory;
* ``paper``   the SplitFT paper's rule: devices whose local accuracy is above the mean take more
  blocks, the others fewer, by ``gamma`` times their deviation in standard deviations;
* ``latency`` the cuts that minimise M. For a candidate step time T every device takes the deepest
  cut whose round trip fits within T (and that it can hold in memory); deeper cuts only lower the
  server's total, so the optimum is one of these "deepest within T" assignments, with T one of the
  devices' round-trip times: the first where the server's total fits too, or the one before it, found
  by bisection (exact for this model). Then :func:`refine_cuts` improves them for the queue (below);
* ``splitft`` ``latency``, then the performance term applied only where it costs at most
  ``perf_slack`` of the makespan, then hysteresis: the previous cuts are kept unless the new ones
  are predicted at least ``hysteresis`` faster, so cuts do not flap on noisy reports.

M is a lower bound. The server serves the batches one at a time in the order they arrive, so
batches that arrive together wait for each other (two devices on slow links arrive last, and the
second waits for the first's server work); the server is idle at a round's start until the first
batch is in; and a device's adapters come before its first step and go after its last, not spread
over the steps. :func:`queued_step_s` replays the round so (Q, the round over its steps; Q >= M), and
:func:`refine_cuts` moves one device's cut at a time while Q falls, starting from M's optimum. Where
nobody waits the two agree (a single device: Q is M plus the adapter messages' latency over the
steps). A decision carries both: M is its predicted step (the metrics put the measured step beside
it), Q what ``latency`` and ``splitft`` minimise. In the U split the queue holds two pieces of server
work a batch, its forward and its backward, with the device's tail between them (its estimate's
``tail_blocks``).

The U split (the device also holds the last ``k`` blocks and the head) has the same shape: a device
runs ``c + k`` blocks and the server ``L - c - k``, the head's cost moves into the device's fixed
part, and the link carries two messages each way. The controller then plans the number of blocks
each device runs, with bounds ``c_min + k_min`` and ``c_max + k_max``, and :func:`split_blocks` puts
them at the bottom or the top of the model: the tail keeps its configured depth where it can (it
guards the labels), the rest goes to the cut (which guards the input).

:func:`ideal_bound` is the balanced lower bound: the same problem with fractional cuts (work split
perfectly between each device and the server), so ``achieved / ideal >= 1`` reads how close a
round came to the best any cut assignment could do.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from splitft.shared.errors import ConfigError
from splitft.shared.job.config import POLICIES

REFINE_SWEEPS = 3  # passes of refine_cuts over the fleet ...
REFINE_BUDGET = 200_000  # ... within this many device replays (trials x devices): a big fleet's decision in ~1 s


@dataclass(frozen=True)
class DeviceEstimate:
    """What the controller knows of one device (EWMA-smoothed measurements, or a profile's figures)."""

    name: str
    block_s: float  # device seconds per block per step (forward + backward)
    fixed_s: float = 0.0  # per-step device time that does not depend on the cut (embeddings, optimiser)
    up_bytes: float = 0.0  # bytes sent up per step (activations, labels)
    down_bytes: float = 0.0  # bytes received per step (the activation gradient)
    uplink_bps: float = math.inf  # bits per second
    downlink_bps: float = math.inf
    rtt_s: float = 0.0
    max_blocks: int = 1 << 30  # the most blocks its memory holds
    accuracy: float | None = None  # local next-token accuracy, for the performance rule
    adapter_block_bytes: float = 0.0  # one block's adapters, each way once a round ...
    steps: int = 1  # ... spread over the round's steps
    # The U split: of the blocks it runs, those of its tail (with the head in fixed_s), which run between the
    # server's forward and backward passes; None: the two-part split. Only the queue (Q) uses it.
    tail_blocks: int | None = None

    @property
    def per_block_s(self) -> float:
        """One more block on this device, per step: its compute and its share of the adapter exchange."""
        exchange = self.adapter_block_bytes * 8 * (1 / self.uplink_bps + 1 / self.downlink_bps) / max(self.steps, 1)
        return self.block_s + exchange

    def step_s(self, cut: float) -> float:
        link = self.up_bytes * 8 / self.uplink_bps + self.down_bytes * 8 / self.downlink_bps + self.rtt_s
        return self.fixed_s + cut * self.per_block_s + link


@dataclass(frozen=True)
class ServerEstimate:
    block_s: float  # server seconds per block per device batch (forward + backward)
    head_s: float = 0.0  # per device batch: final norm, LM head and loss

    def step_s(self, num_layers: int, cuts: Sequence[float]) -> float:
        return sum((num_layers - c) * self.block_s + self.head_s for c in cuts)


@dataclass(frozen=True)
class ControllerSettings:
    policy: str = "splitft"
    num_layers: int = 12
    c_min: int = 1  # a privacy floor as much as a performance bound: shallow activations are easier to invert
    c_max: int | None = None  # default num_layers - 1
    fixed_cut: int = 2  # the `fixed` policy's cut ...
    fixed_cuts: Mapping[str, int] = field(default_factory=dict)  # ... or each named device's
    gamma: float = 1.0  # weight of the performance term
    perf_slack: float = 0.05  # splitft: the performance term may cost this share of the makespan
    hysteresis: float = 0.1  # splitft: new cuts must be predicted this much faster to replace the old

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"controller policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if not 1 <= self.c_min <= self.upper <= self.num_layers - 1:
            raise ConfigError(f"need 1 <= c_min ({self.c_min}) <= c_max ({self.upper}) <= {self.num_layers - 1}")
        for name in ("gamma", "perf_slack", "hysteresis"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"controller.{name} must be a finite number >= 0")

    @property
    def upper(self) -> int:
        return self.num_layers - 1 if self.c_max is None else self.c_max


@dataclass(frozen=True)
class Decision:
    cuts: dict[str, int]
    device_s: dict[str, float]  # predicted round trip of each device at its cut (its work + the server's on it)
    server_s: float  # predicted server time per step
    makespan_s: float  # predicted step time: max(devices, server)
    ideal_s: float  # the balanced lower bound
    reason: str = ""
    kept: bool = False  # hysteresis kept the previous cuts
    queued_s: float = 0.0  # the predicted round over its steps (Q, queued_step_s): what latency and splitft minimise

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.ideal_s if self.ideal_s > 0 else math.inf


@dataclass
class Controller:
    """Chooses cuts each round; :meth:`decide` is pure apart from remembering the last decision."""

    settings: ControllerSettings
    history: list[Decision] = field(default_factory=list)

    def decide(self, devices: Sequence[DeviceEstimate], server: ServerEstimate) -> Decision:
        if not devices:
            raise ConfigError("the controller needs at least one device")
        s = self.settings
        previous = self.history[-1].cuts if self.history else None
        if s.policy == "fixed":
            cuts = {d.name: self._clamp(d, s.fixed_cuts.get(d.name, s.fixed_cut)) for d in devices}
            reason = "fixed cuts"
        elif s.policy == "paper":
            start = previous or {d.name: self._clamp(d, s.fixed_cut) for d in devices}
            cuts = self._performance(devices, {d.name: start.get(d.name, s.fixed_cut) for d in devices})
            reason = "performance rule"
        else:
            cuts = latency_cuts(devices, server, s.num_layers, s.c_min, s.upper)
            cuts = refine_cuts(devices, server, s.num_layers, s.c_min, s.upper, cuts)
            reason = "minimum predicted step time"
            if s.policy == "splitft":
                base = self._queued(devices, server, cuts)
                shifted = self._performance(devices, cuts)
                if self._queued(devices, server, shifted) <= base * (1 + s.perf_slack):
                    cuts, reason = shifted, "minimum predicted step time, then the performance rule"
        decision = self._predict(devices, server, cuts, reason)
        if s.policy == "splitft" and previous is not None and set(previous) == {d.name for d in devices}:
            kept = {d.name: self._clamp(d, previous[d.name]) for d in devices}
            kept_decision = self._predict(devices, server, kept, "kept: the change would not pay", kept=True)
            if kept != cuts and decision.queued_s > kept_decision.queued_s * (1 - s.hysteresis):
                decision = kept_decision
        self.history.append(decision)
        return decision

    # ------------------------------------------------------------------ helpers

    def _clamp(self, device: DeviceEstimate, cut: int) -> int:
        s = self.settings
        return max(s.c_min, min(cut, s.upper, device.max_blocks))

    def _performance(self, devices: Sequence[DeviceEstimate], cuts: Mapping[str, int]) -> dict[str, int]:
        scored = [d for d in devices if d.accuracy is not None]
        if len(scored) < 2:
            return dict(cuts)
        accs = [float(d.accuracy) for d in scored if d.accuracy is not None]
        mean, spread = statistics.fmean(accs), statistics.pstdev(accs) or 1.0
        out = dict(cuts)
        for d in scored:
            assert d.accuracy is not None
            shift = self.settings.gamma * (d.accuracy - mean) / spread
            out[d.name] = self._clamp(d, round(cuts[d.name] + shift))
        return out

    def _queued(self, devices: Sequence[DeviceEstimate], server: ServerEstimate, cuts: Mapping[str, int]) -> float:
        return queued_step_s(devices, server, self.settings.num_layers, cuts)

    def _predict(
        self,
        devices: Sequence[DeviceEstimate],
        server: ServerEstimate,
        cuts: Mapping[str, int],
        reason: str,
        kept: bool = False,
    ) -> Decision:
        s = self.settings
        device_s = {d.name: turnaround_s(d, server, s.num_layers, cuts[d.name]) for d in devices}
        server_s = server.step_s(s.num_layers, [cuts[d.name] for d in devices])
        return Decision(
            cuts=dict(cuts),
            device_s=device_s,
            server_s=server_s,
            makespan_s=max(max(device_s.values()), server_s),
            queued_s=queued_step_s(devices, server, s.num_layers, cuts),
            ideal_s=ideal_bound(devices, server, s.num_layers, s.c_min, s.upper),
            reason=reason,
            kept=kept,
        )


def split_blocks(blocks: int, tail: int, c_min: int, k_min: int, k_max: int) -> tuple[int, int]:
    """U split: (cut, tail) for a device that runs ``blocks`` blocks, keeping the tail ``tail`` deep where the
    bounds allow (``k_min <= k <= k_max``, ``c >= c_min``)."""
    k = max(k_min, min(tail, k_max, blocks - c_min))
    return blocks - k, k


def turnaround_s(device: DeviceEstimate, server: ServerEstimate, num_layers: int, cut: float) -> float:
    """One device's round trip in a step: its compute and link, and the server's work on its batch."""
    return device.step_s(cut) + server.step_s(num_layers, [cut])


def makespan_s(
    devices: Sequence[DeviceEstimate], server: ServerEstimate, num_layers: int, cuts: Mapping[str, float]
) -> float:
    """The predicted step time M of the module docstring."""
    trips = max(turnaround_s(d, server, num_layers, cuts[d.name]) for d in devices)
    return max(trips, server.step_s(num_layers, [cuts[d.name] for d in devices]))


def _messages_s(d: DeviceEstimate, messages: int) -> tuple[float, float]:
    """(up, down) seconds of one of a step's ``messages`` messages each way: the step's bytes split evenly among
    them, each with half a round trip (``rtt_s`` covers the step's round trips)."""
    up = d.up_bytes / messages * 8 / d.uplink_bps + d.rtt_s / (2 * messages)
    return up, d.down_bytes / messages * 8 / d.downlink_bps + d.rtt_s / (2 * messages)


def _trip(
    d: DeviceEstimate, server: ServerEstimate, num_layers: int, cut: float
) -> tuple[float, tuple[float, ...], tuple[float, ...], float]:
    """One device's step for the queue: (before its first server work, the server's works, the device's time
    between them, after the last). Two-part: its forward pass (a third of its compute) and activations up; the
    server's forward and backward; the gradient down and its backward pass (two thirds). U split: two messages
    each way; the server's forward (a third of its work), then the tail's activations down, the device's
    tail, head and loss, the gradient at the tail up, then the server's backward (two thirds)."""
    work = server.step_s(num_layers, [cut])
    if d.tail_blocks is None:
        compute = d.fixed_s + cut * d.block_s
        up, down = _messages_s(d, 1)
        return compute / 3 + up, (work,), (), down + 2 * compute / 3
    tail = min(d.tail_blocks, max(cut - 1, 0))  # the cut keeps a block below the server (split_blocks)
    front = (cut - tail) * d.block_s
    up, down = _messages_s(d, 2)
    between = down + d.fixed_s + tail * d.block_s + up
    return front / 3 + up, (work / 3, 2 * work / 3), (between,), down + 2 * front / 3


def _queue(
    devices: Sequence[DeviceEstimate], server: ServerEstimate, num_layers: int, cuts: Mapping[str, float]
) -> tuple[float, list[float]]:
    """One round replayed as the coordinator serves it: (its seconds, when each step's last batch was served).

    A device gets its blocks' adapters, then per step runs its forward pass and sends its activations; the
    server takes one piece of work at a time in arrival order (in the U split two a batch: its forward, and
    its backward once the device's tail has answered), and a step's batches only once every batch of the
    previous step is answered; the gradient comes back, the device runs its backward pass and its next
    forward (:func:`_trip`). After its last step it sends its adapters back."""
    trips = {d.name: _trip(d, server, num_layers, cuts[d.name]) for d in devices}
    ready, upload = {}, {}
    for d in devices:
        adapter_bits = cuts[d.name] * d.adapter_block_bytes * 8
        ready[d.name] = adapter_bits / d.downlink_bps + d.rtt_s / 2 + trips[d.name][0]  # its first batch arrives
        upload[d.name] = adapter_bits / d.uplink_bps + d.rtt_s / 2
    t, ends = 0.0, []
    for _ in range(max(d.steps for d in devices)):
        waiting = [(arrival, name, 0) for name, arrival in ready.items()]
        heapq.heapify(waiting)
        while waiting:
            arrival, name, part = heapq.heappop(waiting)
            pre, works, between, post = trips[name]
            t = max(t, arrival) + works[part]
            if part + 1 < len(works):  # U split: the device's tail, then the server's backward
                heapq.heappush(waiting, (t + between[part], name, part + 1))
            else:
                ready[name] = t + post + pre  # (t: answered) its next step's batch arrives
        ends.append(t)
    return max(ready[n] - trips[n][0] + upload[n] for n in ready), ends


def queued_step_s(
    devices: Sequence[DeviceEstimate], server: ServerEstimate, num_layers: int, cuts: Mapping[str, float]
) -> float:
    """Q: the round as the coordinator serves it (:func:`_queue`) over its steps, the adapter exchange in it
    as in M; Q >= M (batches that arrive together wait for each other, which M's ``max_i (d_i + s_i)`` leaves
    out, and a device's adapters delay its first step)."""
    seconds, ends = _queue(devices, server, num_layers, cuts)
    return seconds / len(ends)


def steady_step_s(
    devices: Sequence[DeviceEstimate], server: ServerEstimate, num_layers: int, cuts: Mapping[str, float]
) -> float:
    """The time between two steps' ends in the middle of the round (the first step alone when there is one)."""
    _, ends = _queue(devices, server, num_layers, cuts)
    return (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0]


def refine_cuts(
    devices: Sequence[DeviceEstimate],
    server: ServerEstimate,
    num_layers: int,
    c_min: int,
    c_max: int,
    cuts: Mapping[str, int],
    sweeps: int = REFINE_SWEEPS,
    budget: int = REFINE_BUDGET,
) -> dict[str, int]:
    """``cuts`` improved for Q (:func:`queued_step_s`): each device in turn tries every cut it can hold, the
    others held, and keeps any that shortens Q, for at most ``sweeps`` passes over the fleet or until a pass
    changes nothing, and at most ``budget // len(devices)`` trials (each replays every device: a fleet of
    hundreds stops early, with the cuts found so far). From M's optimum this keeps the cuts where the queue
    changes nothing and moves the devices whose batches wait behind each other's."""
    out = dict(cuts)
    best = queued_step_s(devices, server, num_layers, out)
    trials = max(budget // len(devices), 1)
    for _ in range(sweeps):
        improved = False
        for d in devices:
            for cut in range(c_min, min(c_max, d.max_blocks) + 1):
                if cut == out[d.name]:
                    continue
                trials -= 1
                if trials < 0:
                    return out
                trial = {**out, d.name: cut}
                seconds = queued_step_s(devices, server, num_layers, trial)
                if seconds < best * (1 - 1e-9):
                    out, best, improved = trial, seconds, True
        if not improved:
            break
    return out


def _deepest_within(
    device: DeviceEstimate, server: ServerEstimate, num_layers: int, limit_s: float, c_min: int, c_max: int
) -> int | None:
    """The deepest cut whose round trip fits within ``limit_s`` (None if none does)."""
    cap = min(c_max, device.max_blocks)
    for cut in range(cap, c_min - 1, -1):
        if turnaround_s(device, server, num_layers, cut) <= limit_s + 1e-12:
            return cut
    return None


def latency_cuts(
    devices: Sequence[DeviceEstimate], server: ServerEstimate, num_layers: int, c_min: int, c_max: int
) -> dict[str, int]:
    """Cuts minimising the predicted step time M (exact for this model)."""
    for d in devices:
        if min(c_max, d.max_blocks) < c_min:
            raise ConfigError(f"device {d.name} holds at most {d.max_blocks} blocks, below c_min = {c_min}")
    trips = {
        d.name: [turnaround_s(d, server, num_layers, c) for c in range(c_min, min(c_max, d.max_blocks) + 1)]
        for d in devices
    }
    floor = max(min(t) for t in trips.values())  # no T below this fits every device
    candidates = sorted({t for ts in trips.values() for t in ts if t >= floor})

    def within(limit: float) -> dict[str, int]:
        picked = {d.name: _deepest_within(d, server, num_layers, limit, c_min, c_max) for d in devices}
        return {name: int(c) for name, c in picked.items() if c is not None}  # every device: limit >= floor

    def fits(k: int) -> bool:
        return server.step_s(num_layers, list(within(candidates[k]).values())) <= candidates[k]

    # Each device's deepest cut within T only deepens as T grows, so the server's total only falls: the
    # candidates where it still exceeds T come first, and there M is the server's total, falling. The optimum is
    # the first T where the server fits (a larger T can only lengthen the devices' part), or the one before it;
    # bisection finds the first in O(log) assignments (a fleet of hundreds has thousands of candidates).
    lo, hi = 0, len(candidates)  # the first fitting candidate is in [lo, hi] (len: none fits)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    best: tuple[float, dict[str, int]] | None = None
    for k in (lo - 1, lo):
        if 0 <= k < len(candidates):
            cuts = within(candidates[k])
            span = makespan_s(devices, server, num_layers, cuts)
            if best is None or span < best[0] - 1e-12:
                best = (span, cuts)
    assert best is not None
    return hand_back(devices, server, num_layers, c_min, *best)


def hand_back(
    devices: Sequence[DeviceEstimate],
    server: ServerEstimate,
    num_layers: int,
    c_min: int,
    target: float,
    cuts: dict[str, int],
) -> dict[str, int]:
    """Ties: hand blocks back to the server while the step time M stays at ``target``, slowest device first,
    so each device's own work is as small as the step allows (with a fast server, every device gets c_min;
    the privacy floor is then what bounds the cut). Changes and returns ``cuts``.

    One block handed back changes that device's round trip and adds one block to the server's step (it is
    linear in the blocks), so each trial is checked against the others' longest trip in O(1): the loop is
    O(devices) per move, not O(devices^2)."""
    by_name = {d.name: d for d in devices}
    while True:
        trip_of = {name: turnaround_s(by_name[name], server, num_layers, cut) for name, cut in cuts.items()}
        ordered = sorted(trip_of.values(), reverse=True)
        first, second = ordered[0], ordered[1] if len(ordered) > 1 else float("-inf")
        server_after = server.step_s(num_layers, list(cuts.values())) + server.block_s
        movable = []
        for name, cut in cuts.items():
            if cut > c_min:
                others = second if trip_of[name] == first else first
                trip = turnaround_s(by_name[name], server, num_layers, cut - 1)
                if max(others, trip, server_after) <= target + 1e-12:
                    movable.append(name)
        if not movable:
            return cuts
        slowest = max(movable, key=lambda n: by_name[n].step_s(cuts[n]))
        cuts[slowest] -= 1


def ideal_bound(
    devices: Sequence[DeviceEstimate], server: ServerEstimate, num_layers: int, c_min: int, c_max: int
) -> float:
    """The balanced lower bound: the least step time M with fractional cuts (bisection on T)."""

    def deepest(d: DeviceEstimate, limit: float) -> float | None:
        cap = float(min(c_max, d.max_blocks))
        slope = d.per_block_s - server.block_s  # what one more block on the device does to its round trip
        if slope <= 0:
            return cap if turnaround_s(d, server, num_layers, cap) <= limit else None
        x = (limit - turnaround_s(d, server, num_layers, 0.0)) / slope
        return min(x, cap) if x >= c_min else None

    def feasible(limit: float) -> bool:
        cuts = [deepest(d, limit) for d in devices]
        return (
            all(c is not None for c in cuts) and server.step_s(num_layers, [c for c in cuts if c is not None]) <= limit
        )

    lo = 0.0
    hi = makespan_s(devices, server, num_layers, latency_cuts(devices, server, num_layers, c_min, c_max))
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
    return hi
