"""The regimes study: scenario files (every error names its line), the oracle (optimal on a small case, by
brute force on the simulated clock), and the shipped regimes against their baselines."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitft.bench.clock import Server
from splitft.bench.regimes import (
    RegimeSettings,
    fleet_at,
    make_costs,
    oracle_cuts,
    run_policy,
    run_regime,
)
from splitft.bench.scenario import load_scenario, parse_scenario
from splitft.shared.errors import ScenarioError

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "benchmarks" / "scenarios"
HOST = Server(0.05e12, 0.1e12)  # pinned host rates (FLOP/s): the results do not depend on this machine's load

GOOD = """\
# a fleet
name small
server 5
rounds 6
device nano-1 jetson-nano      # comment after a directive
device laptop-1 laptop

at 3 throttle laptop-1 0.3
at 4 link nano-1 2 2 80
at 5 leave nano-1
at 5 join pi-1 raspberry-pi-5
at 6 link laptop-1 profile
"""


def test_a_scenario_file_reads_its_fleet_and_events() -> None:
    s = parse_scenario(GOOD, "small.scenario")
    assert (s.name, s.server_speedup, s.rounds) == ("small", 5.0, 6)
    assert [name for name, _ in s.devices] == ["nano-1", "laptop-1"]
    assert [(e.round, e.action, e.device, e.line) for e in s.events] == [
        (3, "throttle", "laptop-1", 8), (4, "link", "nano-1", 9), (5, "leave", "nano-1", 10),
        (5, "join", "pi-1", 11), (6, "link", "laptop-1", 12),
    ]  # fmt: skip
    assert [d.name for d in fleet_at(s, 2)] == ["nano-1", "laptop-1"]
    at5 = {d.name: d for d in fleet_at(s, 5)}
    assert set(at5) == {"laptop-1", "pi-1"} and at5["laptop-1"].compute == 0.3
    assert fleet_at(s, 4)[0].link == (2.0, 2.0, 80.0) and fleet_at(s, 6)[0].link is None


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (5, "device nano-2 jetson-nanoo", "jetson-nanoo"),
        (5, "device nano-1 laptop", "declared twice"),
        (5, "dvice x laptop", "unknown directive 'dvice'"),
        (5, "server fast", "must be a number"),
        (5, "server -2", "positive"),
        (5, "at 1 leave nano-1", "round 2 or later"),
        (5, "at 3 leave nano-9", "no device 'nano-9'"),
        (5, "at 3 throttle nano-1 1.5", "at most 1"),
        (5, "at 3 throttle nano-1", "share of compute"),
        (5, "at 3 link nano-1 2 2", "uplink and downlink"),
        (5, "at 3 link nano-1 2 2 -1", "RTT"),
        (5, "at 3 explode nano-1", "unknown action 'explode'"),
        (5, "at 3 join nano-1 laptop", "already exists"),
        (5, "at x leave nano-1", "whole number"),
        (5, "at 9 leave nano-1", "after the last round"),
    ],
)
def test_a_bad_scenario_line_is_named(line: int, text: str, message: str) -> None:
    head = "name bad\nserver 5\nrounds 6\ndevice nano-1 jetson-nano\n"
    with pytest.raises(ScenarioError, match=f"bad.scenario line {line}: .*{message}"):
        parse_scenario(head + text + "\n", "bad.scenario")


def test_events_in_the_wrong_order_and_missing_parts_are_named(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="line 6: events must be in round order"):
        parse_scenario("rounds 6\ndevice a laptop\ndevice b laptop\nat 4 leave a\n\nat 3 leave b\n", "s")
    with pytest.raises(ScenarioError, match="line 3: devices come before the events"):
        parse_scenario("rounds 6\nat 3 join a laptop\ndevice b laptop\n", "s")
    with pytest.raises(ScenarioError, match="at round 4"):  # left at round 3: gone for the round-4 event
        parse_scenario("rounds 6\ndevice a laptop\ndevice b laptop\nat 3 leave a\nat 4 throttle a 0.5\n", "s")
    with pytest.raises(ScenarioError, match="no devices"):
        parse_scenario("rounds 6\n", "s")
    with pytest.raises(ScenarioError, match="no 'rounds N' line"):
        parse_scenario("device a laptop\n", "s")
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "missing.scenario")
    (tmp_path / "binary.scenario").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "binary.scenario")


@pytest.mark.parametrize("split", ["two-part", "u"])
def test_the_oracle_is_optimal_on_a_small_case_by_brute_force(split: str) -> None:
    """Three devices, every cut vector of the 12-block base tried on the simulated clock against the oracle's."""
    text = "rounds 2\nserver 3\ndevice nano-1 jetson-nano\ndevice pi-1 raspberry-pi-5\ndevice laptop-1 laptop\n"
    for speedup in ("3", "30"):
        scenario = parse_scenario(text.replace("server 3", f"server {speedup}"), "small")
        costs = make_costs(RegimeSettings(split=split), scenario.server_speedup, HOST)
        fleet = fleet_at(scenario, 1)
        caps = [min(costs.layers - 1, costs.max_blocks(d.profile)) for d in fleet]
        best = min(
            costs.simulate(fleet, {d.name: c for d, c in zip(fleet, cuts, strict=True)})[0]
            for cuts in itertools.product(*(range(1, cap + 1) for cap in caps))
        )
        oracle = costs.simulate(fleet, oracle_cuts(costs, fleet))[0]
        # Exact in the two-part split; in the U split its search (from the step model's optimum and the best
        # single cut, one device at a time) can stop 0.3% short of the optimum at server x3 (documented).
        assert best <= oracle <= best * (1 + (1e-9 if split == "two-part" else 0.005)), (oracle, best)


@pytest.mark.parametrize(
    ("name", "split"),
    [("device-bound", "two-part"), ("device-bound", "u"), ("server-bound", "two-part"), ("server-bound", "u"),
     ("dynamic", "two-part")],
)  # fmt: skip
def test_the_shipped_regimes_against_best_fixed_and_the_oracle(name: str, split: str) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.scenario")
    result = run_regime(make_costs(RegimeSettings(split=split), scenario.server_speedup, HOST), scenario)
    total = result["total_s"]
    fixed = [v for p, v in total.items() if p.startswith("fixed-")]
    assert total[result["best_fixed"]] == min(fixed) and len(fixed) == 11
    assert total["oracle"] <= min(fixed) * (1 + 1e-9)  # the oracle is never beaten by a fixed cut
    assert total["splitft"] <= min(fixed) * 1.05  # and splitft never loses to the best fixed cut by more than 5%
    assert result["step_error_median"] < 0.1
    for event in result["resettle_rounds"]:
        assert event["rounds_to_settle"] is not None and event["rounds_to_settle"] <= 2, event
    rows = result["runs"]["splitft"]
    assert [r["round"] for r in rows] == list(range(1, scenario.rounds + 1))
    assert all(set(r["cuts"]) == {d.name for d in fleet_at(scenario, r["round"])} for r in rows)


def test_a_fixed_cut_is_capped_by_memory() -> None:
    scenario = parse_scenario("rounds 1\ndevice nano-1 jetson-nano\ndevice agx-1 jetson-agx-orin\n", "s")
    costs = make_costs(RegimeSettings(), 5.0, HOST)
    (row,) = run_policy(costs, scenario, "fixed-11")
    assert row["cuts"]["agx-1"] == 11 and row["cuts"]["nano-1"] == min(11, costs.max_blocks(scenario.devices[0][1]))


def test_the_script_writes_its_results_and_names_a_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.scenario"
    bad.write_text("rounds 3\ndevice a laptop\nat 2 throttle b 0.5\n")
    script = [sys.executable, str(ROOT / "scripts" / "regimes.py"), "--host-tflops", "0.05,0.1"]
    done = subprocess.run([*script, str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bad.scenario line 3: no device 'b'" in done.stderr, done.stderr
    good = tmp_path / "good.scenario"
    good.write_text("name good\nserver 5\nrounds 3\ndevice a laptop\ndevice b jetson-nano\nat 2 throttle a 0.3\n")
    done = subprocess.run(
        [*script, str(good), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "regimes.json").read_text())
    assert result["regimes"][0]["scenario"] == "good" and (tmp_path / "out" / "good-u.png").stat().st_size > 10_000
    report = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| good | two-part | 2 | x5 |" in report and "| good | u | 2 | x5 |" in report and "price of privacy" in report
    )
