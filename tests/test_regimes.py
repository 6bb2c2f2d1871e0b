"""The regimes study: scenario files (every error names its line), their servers (named, never measured: a
regime gives the same table on any machine), the oracle (optimal on a small case, by brute force on the
simulated clock), the shipped regimes against their baselines, and the costs of another model's shape."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from splitft.bench import clock, regimes_model
from splitft.bench.clock import Server
from splitft.bench.regimes import (
    RegimeSettings,
    fixed_policies,
    fleet_at,
    make_costs,
    oracle_cuts,
    run_policy,
    run_regime,
)
from splitft.bench.regimes_report import report
from splitft.bench.scenario import load_scenario, parse_scenario
from splitft.coordinator.estimates import adapter_block_bytes
from splitft.shared.errors import ScenarioError
from splitft.shared.model.loading import block_flops, load_config
from splitft.shared.model.lora import LoraSettings
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "benchmarks" / "scenarios"
SERVER = Server(0.25e12, 0.5e12)  # 5 x (0.05, 0.1) TFLOP/s, blocks and head

GOOD = """\
# a fleet
name small
server 0.25,0.5
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
    assert (s.name, s.server_spec, s.server, s.rounds) == ("small", "0.25,0.5", SERVER, 6)
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
        (5, "server fast", "unknown device profile 'fast'"),
        (5, "server 5", "lone number.*'5,5'"),  # once 'this host x 5': refused, never read as TFLOP/s
        (5, "server -2,1", "positive"),
        (5, "server 1,2,3", "two numbers"),
        (5, "server 1,fast", "two numbers"),
        (5, "server gpu-l4 5", "profile name or 'blocks,head'"),
        (5, "server missing.toml", "does not exist"),
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
    head = "name bad\nserver 0.25,0.5\nrounds 6\ndevice nano-1 jetson-nano\n"
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
    text = "rounds 2\nserver 0.15,0.3\ndevice nano-1 jetson-nano\ndevice pi-1 raspberry-pi-5\ndevice laptop-1 laptop\n"
    for rates in ("0.15,0.3", "1.5,3"):  # 3 and 30 x (0.05, 0.1) TFLOP/s
        scenario = parse_scenario(text.replace("server 0.15,0.3", f"server {rates}"), "small")
        assert scenario.server is not None
        costs = make_costs(RegimeSettings(split=split), scenario.server)
        fleet = fleet_at(scenario, 1)
        caps = [min(costs.layers - 1, costs.max_blocks(d.profile)) for d in fleet]
        best = min(
            costs.simulate(fleet, {d.name: c for d, c in zip(fleet, cuts, strict=True)})[0]
            for cuts in itertools.product(*(range(1, cap + 1) for cap in caps))
        )
        oracle = costs.simulate(fleet, oracle_cuts(costs, fleet))[0]
        # Exact in the two-part split; in the U split its search (from the step model's optimum and the best
        # single cut, one device at a time) can stop 0.3% short of the optimum at 0.15,0.3 (documented).
        assert best <= oracle <= best * (1 + (1e-9 if split == "two-part" else 0.005)), (oracle, best)


@pytest.mark.parametrize(
    ("name", "split"),
    [("device-bound", "two-part"), ("device-bound", "u"), ("server-bound", "two-part"), ("server-bound", "u"),
     ("dynamic", "two-part")],
)  # fmt: skip
def test_the_shipped_regimes_against_best_fixed_and_the_oracle(name: str, split: str) -> None:
    scenario = load_scenario(SCENARIOS / f"{name}.scenario")
    assert scenario.server is not None
    result = run_regime(make_costs(RegimeSettings(split=split), scenario.server), scenario)
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
    costs = make_costs(RegimeSettings(), SERVER)
    (row,) = run_policy(costs, scenario, "fixed-11")
    assert row["cuts"]["agx-1"] == 11 and row["cuts"]["nano-1"] == min(11, costs.max_blocks(scenario.devices[0][1]))


def test_a_server_line_names_a_profile_or_rates_in_tflops(tmp_path: Path) -> None:
    """A scenario's server is absolute: a profile's sustained throughput, or TFLOP/s for the blocks and the head."""
    l4 = load_profile("gpu-l4").throughput_gflops * 1e9
    text = "rounds 2\ndevice a laptop\n"
    assert parse_scenario("server gpu-l4\n" + text, "s").server == Server(l4, l4)
    assert parse_scenario("server 0.285,0.482\n" + text, "s").server == Server(0.285e12, 0.482e12)
    profile = tmp_path / "my-gpu.toml"
    profile.write_text((ROOT / "firmware_profiles" / "gpu-l4.toml").read_text().replace('"gpu-l4"', '"my-gpu"'))
    assert parse_scenario(f"server {profile}\n" + text, "s").server == Server(l4, l4)
    assert parse_scenario(text, "s").server is None  # none named: the command line's --server must


def test_the_shipped_servers_are_the_published_rates_exactly() -> None:
    """5 and 100 x the 2-core host the published tables were measured on (0.057, 0.0964 TFLOP/s), to the bit."""
    host = Server(0.057e12, 0.0964e12)
    for name, factor in (("device-bound", 100), ("server-bound", 5), ("dynamic", 5)):
        server = load_scenario(SCENARIOS / f"{name}.scenario").server
        assert server == Server(host.block_flops_per_s * factor, host.head_flops_per_s * factor), name


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regimes_script", ROOT / "scripts" / "regimes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the regimes calibrated this machine")


def test_two_runs_give_the_same_tables_to_the_last_digit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server comes from a profile and nothing is measured: the script's results and report are identical."""
    script = _script()
    for where in (clock, regimes_model, script):
        monkeypatch.setattr(where, "calibrate_server" if where is clock else "calibrate_host", _never)
    scenario = tmp_path / "fleet.scenario"
    scenario.write_text("server gpu-l4\nrounds 4\ndevice a laptop\ndevice b jetson-nano\nat 3 throttle a 0.5\n")
    outputs = []
    for run in ("one", "two"):
        monkeypatch.setattr(sys, "argv", ["regimes.py", str(scenario), "--out", str(tmp_path / run)])
        assert script.main() == 0
        results = json.loads((tmp_path / run / "regimes.json").read_text())
        assert results["meta"].pop("command").endswith(f"--out {tmp_path / run}")  # the only difference
        outputs.append((results, (tmp_path / run / "report.md").read_text()))
    assert outputs[0] == outputs[1]
    results = outputs[0][0]
    assert results["meta"]["servers"] == {"fleet": {"server": "gpu-l4", "tflops": "12.1,12.1"}}
    assert "| fleet | two-part | 2 | gpu-l4 (12.1,12.1 TFLOP/s) |" in outputs[0][1]
    # And in-process, the full result dicts (every round of every policy) and the report text.
    loaded = load_scenario(scenario)
    assert loaded.server is not None
    runs = [run_regime(make_costs(RegimeSettings(split="u"), loaded.server), loaded) for _ in range(2)]
    assert runs[0] == runs[1]
    meta = {"model": regimes_model.describe_model("base", "", regimes_model.base_config())}
    assert report(runs[:1], meta) == report(runs[1:], meta)


def test_the_costs_follow_another_models_shape() -> None:
    """tiny-llama (and a 6-block variant): its blocks, hidden size, FLOPs, memory and adapters set the costs."""
    config = load_config("tiny-llama")
    base = make_costs(RegimeSettings(), SERVER)
    llama = make_costs(RegimeSettings(), SERVER, config)
    assert (llama.layers, llama.hidden) == (12, 128) and (base.layers, base.hidden) == (12, 256)
    device = fleet_at(parse_scenario("rounds 1\ndevice a laptop\n", "s"), 1)[0].clock()
    assert llama.block_s(device) == 2 * block_flops(config, 4, 192) / device.flops_per_s
    assert llama.block_mb() < base.block_mb() and llama.grad_bytes == base.grad_bytes / 2  # hidden 128 vs 256
    # The adapters a block exchanges are the ones the runtime builds for the model (fp32, rank 16 everywhere).
    for model in ("tiny-llama", "tiny-gpt2"):
        segment = build_segment(model, SegmentSpec.whole(12), lora=LoraSettings(r=16, r_cut=16))
        costs = make_costs(RegimeSettings(), SERVER, load_config(model))
        assert costs.adapter_bytes(1) == adapter_block_bytes(segment.lora_parameters()), model
    # The cuts tried follow the model's blocks.
    six = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 6})
    small = make_costs(RegimeSettings(), SERVER, six)
    assert fixed_policies(small) == [f"fixed-{c}" for c in range(1, 6)]
    scenario = parse_scenario("rounds 2\ndevice a laptop\ndevice b jetson-nano\n", "s")
    result = run_regime(small, scenario)
    assert result["layers"] == 6 and all(1 <= c <= 5 for r in result["runs"]["splitft"] for c in r["cuts"].values())
    assert regimes_model.describe_model("tiny-llama", "tiny-llama", config)["layers"] == 12


def test_the_script_names_a_bad_line_a_missing_server_and_a_bad_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    bad = tmp_path / "bad.scenario"
    bad.write_text("server gpu-l4\nrounds 3\ndevice a laptop\nat 2 throttle b 0.5\n")
    none = tmp_path / "none.scenario"
    none.write_text("rounds 3\ndevice a laptop\n")
    for argv, message in (
        ([str(bad)], "bad.scenario line 4: no device 'b'"),
        ([str(none)], "scenario 'none' names no server: add a 'server' line or pass --server"),
        ([str(none), "--server", "5"], "lone number"),
        ([str(none), "--server", "gpu-l9"], "unknown device profile 'gpu-l9'"),
        ([str(none), "--model", "no-such-model"], "neither a preset"),
    ):
        monkeypatch.setattr(sys, "argv", ["regimes.py", *argv, "--out", str(tmp_path / "out")])
        assert script.main() == 2, argv
        assert message in capsys.readouterr().err, argv


def test_the_script_runs_another_model_and_says_which(tmp_path: Path) -> None:
    good = tmp_path / "good.scenario"
    good.write_text("name good\nrounds 3\ndevice a laptop\ndevice b jetson-nano\nat 2 throttle a 0.3\n")
    script = [sys.executable, str(ROOT / "scripts" / "regimes.py"), str(good), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [*script, "--model", "tiny-llama", "--server", "0.25,0.5"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "regimes.json").read_text())
    model = result["meta"]["model"]
    assert (model["name"], model["type"], model["layers"], model["hidden"]) == ("tiny-llama", "llama", 12, 128)
    assert result["meta"]["servers"] == {"good": {"server": "0.25,0.5", "tflops": "0.25,0.5"}}
    assert result["regimes"][0]["scenario"] == "good" and (tmp_path / "out" / "good-u.png").stat().st_size > 10_000
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("Model: tiny-llama (llama): ") and "12 blocks, hidden 128" in report
    assert "| good | two-part | 2 | 0.25,0.5 TFLOP/s |" in report and "| good | u | 2 | 0.25,0.5 TFLOP/s |" in report
    assert "price of privacy" in report
