"""The baselines chosen in hindsight, replayed from the ``fixed`` run: every single cut for all devices, and the
oracle's cuts, round by round.

The ``fixed`` run trains with the same LoRA rank at every block, and the split is exact (a test: federated
split learning equals centralised), so a run at any other cut learns the same adapters from the same batches
(up to the wire's rounding): the same perplexity after every round. Only its time differs, and that the
simulated clock replays: the same batches and bytes, the other cuts (:func:`methods.round_timing`).

* ``fixed-c``: every device at cut ``c`` (capped at the deepest part its memory holds); the report's
  *best fixed* is the one that reached the target soonest, a choice made in hindsight;
* ``oracle``: each round at the cuts that make that round shortest on the simulated clock, found by
  :func:`oracle_cuts` (checked against brute force in the tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from splitft.bench.clock import CostModel
from splitft.bench.study.methods import (
    AgentRound,
    Fleet,
    memory_estimate_mb,
    replay_split,
    round_timing,
    split_rounds,
)
from splitft.bench.study.settings import FLEET, StudySettings
from splitft.shared.profiles import load_profile

Limits = Mapping[str, int]  # each device's deepest cut


def cut_limits(settings: StudySettings, base: Path, fleet: Fleet, layers: int) -> dict[str, int]:
    """The deepest cut each device's memory holds (the memory estimate of its part against its profile's usable
    memory), at most the deepest cut the split allows."""
    deepest = layers - 1 - (settings.tail if settings.split == "u" else 0)
    need = {c: memory_estimate_mb(settings, base, c, head=settings.split == "u") for c in range(1, deepest + 1)}
    limits = {}
    for name, profile in zip(fleet.names, FLEET, strict=True):
        usable = load_profile(profile).usable_mb
        limits[name] = max((c for c, mb in need.items() if mb <= usable), default=1)
    return limits


def brute_force_cuts(costs: CostModel, agents: Sequence[AgentRound], limits: Limits) -> dict[str, int]:
    """The cuts of the shortest round among all combinations (exponential: small cases only)."""
    names = [a.name for a in agents]
    best: tuple[float, dict[str, int]] | None = None
    for combo in itertools.product(*(range(1, limits[n] + 1) for n in names)):
        cuts = dict(zip(names, combo, strict=True))
        seconds = round_timing(costs, agents, cuts).seconds
        if best is None or seconds < best[0]:
            best = (seconds, cuts)
    assert best is not None
    return best[1]


def oracle_cuts(costs: CostModel, agents: Sequence[AgentRound], limits: Limits, starts: int = 3) -> dict[str, int]:
    """The cuts that make the round shortest: from each of the ``starts`` best single cuts for all, one device
    at a time tries every cut and keeps any that shortens the round, until none does; the best result."""
    names = [a.name for a in agents]

    def seconds(cuts: Mapping[str, int]) -> float:
        return round_timing(costs, agents, cuts).seconds

    uniform = sorted(
        ({n: min(c, limits[n]) for n in names} for c in range(1, max(limits.values()) + 1)),
        key=seconds,
    )
    best: tuple[float, dict[str, int]] | None = None
    for start in uniform[:starts]:
        cuts, current = dict(start), seconds(start)
        improved = True
        while improved:
            improved = False
            for n in names:
                for c in range(1, limits[n] + 1):
                    if c == cuts[n]:
                        continue
                    trial = {**cuts, n: c}
                    t = seconds(trial)
                    if t < current - 1e-12:
                        cuts, current, improved = trial, t, True
        if best is None or current < best[0]:
            best = (current, cuts)
    assert best is not None
    return best[1]


def hindsight_rows(
    settings: StudySettings,
    base: Path,
    fleet: Fleet,
    costs: CostModel,
    metrics: Sequence[Mapping[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """The fixed run replayed at every single cut (``fixed-c``) and at the oracle's cuts (``oracle``)."""
    limits = cut_limits(settings, base, fleet, costs.layers)

    def single(cut: int) -> Callable[[Sequence[AgentRound]], Mapping[str, int]]:
        return lambda agents: {a.name: min(cut, limits[a.name]) for a in agents}

    def oracle(agents: Sequence[AgentRound]) -> Mapping[str, int]:
        return oracle_cuts(costs, agents, limits)

    replays = {f"fixed-{c}": single(c) for c in range(1, max(limits.values()) + 1)}
    replays["oracle"] = oracle
    rounds = split_rounds(settings, base, fleet, metrics)
    return {
        label: replay_split(settings, base, fleet, costs, metrics, cuts_of=f, rounds=rounds)
        for label, f in replays.items()
    }
