#!/usr/bin/env python3
"""Where adaptation pays: every cut policy on the regimes' scenario files, on the simulated clock.

Runs each scenario (benchmarks/scenarios/*.scenario by default) under every fixed cut, the splitft and
latency policies (the product's controller and estimator) and the oracle, and writes regimes.json, one
plot per regime and report.md to --out; --write BENCHMARKS.md also puts the report in BENCHMARKS.md and
the plots and light results in benchmarks/regimes/. Seconds on 2 cores; see splitft.bench.regimes.

    python scripts/regimes.py                                   # calibrate this host, run, print the table
    python scripts/regimes.py --write BENCHMARKS.md
    python scripts/regimes.py my-fleet.scenario --host-tflops 0.11,0.09   # another scenario, pinned host rates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("device-bound", "server-bound", "dynamic")


def main() -> int:
    from splitft.bench.clock import Server
    from splitft.bench.regimes import RegimeSettings, calibrate_host, make_costs, run_regime
    from splitft.bench.regimes_report import before_after, light, plot_name, plot_regime, privacy_price, report
    from splitft.bench.scenario import load_scenario
    from splitft.bench.sections import cpu_name, write_section
    from splitft.shared.errors import ScenarioError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", type=Path, help="scenario files (default: the three regimes)")
    parser.add_argument("--out", type=Path, default=Path("regimes"), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--host-tflops", help="this host's server rates, 'blocks,head' in TFLOP/s (default: measure them)"
    )
    parser.add_argument("--write", type=Path, help="also write the report into this markdown file")
    args = parser.parse_args()

    paths = args.scenarios or [ROOT / "benchmarks" / "scenarios" / f"{n}.scenario" for n in SCENARIOS]
    try:
        scenarios = [load_scenario(p) for p in paths]
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = RegimeSettings()
    if args.host_tflops:
        try:
            blocks, head = (float(x) * 1e12 for x in args.host_tflops.split(","))
        except ValueError:
            print(f"error: --host-tflops must be two numbers, 'blocks,head', got {args.host_tflops!r}", file=sys.stderr)
            return 2
        host, calibration = Server(blocks, head), {}
    else:
        print("calibrating this host's server rates ...", file=sys.stderr)
        host, calibration = calibrate_host(settings)
    rates = f"{host.block_flops_per_s / 1e12:.4f},{host.head_flops_per_s / 1e12:.4f}"
    print(f"host rates (TFLOP/s, blocks,head): {rates}", file=sys.stderr)

    results = []
    for scenario, split in ((s, split) for s in scenarios for split in ("two-part", "u")):
        costs = make_costs(dataclasses.replace(settings, split=split), scenario.server_speedup, host)
        result = run_regime(costs, scenario)
        results.append(result)
        print(
            f"{scenario.name} ({split}): splitft {result['splitft_vs_best_fixed']:.2f}x sooner than best fixed "
            f"({result['best_fixed']}), {result['splitft_over_oracle']:.3f} of the oracle's time",
            file=sys.stderr,
        )
    before = [
        run_regime(make_costs(dataclasses.replace(settings, controller_before=True), s.server_speedup, host), s)
        for s in scenarios
    ]
    command = "python scripts/regimes.py " + " ".join(sys.argv[1:])
    meta = {"date": date.today().isoformat(), "host": cpu_name(), "host_tflops": rates, "calibration": calibration,
            "settings": dataclasses.asdict(settings), "command": command.strip()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regimes.json").write_text(json.dumps({"meta": meta, "regimes": results}, indent=1, default=str))
    for result in results:
        plot_regime(result, args.out / plot_name(result))
    body = (
        report(results, meta) + "\n\n**The price of privacy** (U split against two-part):\n\n" + privacy_price(results)
    )
    after = [r for r in results if r["split"] == "two-part"]
    body += (
        "\n\n**The controller before and after** this study's changes (the adapter exchange in the step model, "
        "links measured from the uploads, a 2x change replacing an estimate, round 1 planned from the join "
        "benchmarks):\n\n" + before_after(before, after)
    )
    (args.out / "report.md").write_text(body + "\n")
    print(body)
    if args.write:
        folder = ROOT / "benchmarks" / "regimes"
        folder.mkdir(parents=True, exist_ok=True)
        for result in results:
            plot_regime(result, folder / plot_name(result))
        light_results = {"meta": meta, "regimes": [light(r) for r in results]}
        (folder / "regimes.json").write_text(json.dumps(light_results, indent=1, default=str))
        pinned = meta["command"] if args.host_tflops else f"{meta['command']} --host-tflops {rates}"
        header = (
            "## Where adaptation pays: regimes, best fixed cut and oracle (simulated clock)\n\n"
            f"Measured {meta['date']} on {meta['host']}: host server rates {rates} TFLOP/s (blocks, head), the "
            f"scenario's server that times its factor; `{pinned}` reproduces these numbers exactly (about 40 s). "
            "Scenario files: `benchmarks/scenarios/`. Every policy runs the same rounds on the same fleet and "
            "trains the same adapters (the split is exact and every block has the same rank here), so the time of "
            "the run is the time to any target perplexity; *best fixed* is the fastest of the eleven single cuts, "
            "chosen in hindsight; the *oracle* knows every device's true speed and link the moment they change. "
            "What the simulation leaves out: measurement noise, the time a device takes to rebuild its segment "
            "when its cut moves, and varying batch lengths (`splitft.bench.regimes`).\n\n"
        )
        write_section(args.write, "regimes", header + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
