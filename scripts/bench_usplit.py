#!/usr/bin/env python3
"""The price of privacy: the U-shaped split against the two-part split, on the study's fleet and base.

Two real runs through Mosquitto with the study's harness (scripts/study.py): the five emulated devices
(virtual emulation), the same length-Dirichlet GSM8K partition (alpha 1), the same pretrained base, the
same token budget and seeds, every device at the study's fixed cut; one run in the two-part split, one in
the U split (each device also holds the last ``--tail`` blocks and the head). Measured for each:

* bytes per device step, up and down (what the agents sent and received, from the coordinator's metrics);
* the step time on the simulated clock (splitft.bench.clock) at the run's cut, and at every other cut
  for all devices (the rounds replayed with the same bytes, which do not depend on the cut), so that each
  split is also compared at its best fixed cut in hindsight; in two regimes, a server 100x this host (the
  study's, device-bound) and 5x (a modest edge server, where the server's shared load matters);
* final perplexity on GSM8K test problems.

    python scripts/bench_usplit.py [--rounds 5] [--tail 1] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from splitft.bench.clock import CostModel, Server, calibrate_server
from splitft.bench.sections import cpu_name, write_section
from splitft.bench.study import QUICK, read_jsonl
from splitft.bench.study.methods import final_evaluation, make_fleet, replay_split, run_split
from splitft.bench.study.run import mqtt_broker
from splitft.bench.study.settings import say
from splitft.shared.model.loading import load_config, num_layers
from splitft.tools import pretrain as pretrain_base

SPEEDUPS = (100.0, 5.0)


def mean_step_s(rows: list[dict[str, Any]]) -> float:
    return statistics.fmean(r["step_s"] for r in rows[1:])


def at_cut(metrics: list[dict[str, Any]], cut: int) -> list[dict[str, Any]]:
    """The run's metrics with every device moved to ``cut`` (for replaying the same rounds there)."""
    moved = json.loads(json.dumps(metrics))
    for record in moved[1:]:
        for agent in record["agents"].values():
            agent["cut"] = cut
    return moved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=QUICK.rounds)
    parser.add_argument("--tail", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-usplit"))
    parser.add_argument("--base", type=Path, help="a base model folder (default: the study's pretrained base)")
    parser.add_argument("--write", type=Path, help="put the results in this markdown file (BENCHMARKS.md)")
    args = parser.parse_args()

    started = time.perf_counter()
    pre = pretrain_base.Settings(family="gpt2")  # the full study's base, as scripts/study.py builds it
    pre = dataclasses.replace(pre, precision="bf16" if pretrain_base.bf16_is_fast("cpu") else "fp32")
    base = args.base or pretrain_base.build_base(pre, log=lambda m: say(f"  pretrain: {m}"))
    settings = dataclasses.replace(QUICK, variant="usplit", rounds=args.rounds, tail=args.tail, alphas=(1.0,))
    layers = num_layers(load_config(str(base)))
    server, calibration = calibrate_server(str(base), settings.batch_size, settings.max_length)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with mqtt_broker(args.out / "broker") as broker:
        for split in ("two-part", "u"):
            s = dataclasses.replace(settings, split=split)
            run_dir = args.out / split
            run_dir.mkdir(parents=True, exist_ok=True)
            say(f"{split}: a real run at cut {s.fixed_cut}" + (f", tail {s.tail}" if split == "u" else ""))
            fleet = make_fleet(s, base, 1.0, run_dir / "partition")
            costs = CostModel(load_config(str(base)), _scaled(server, SPEEDUPS[0]))
            _, summary = run_split(s, base, fleet, costs, "fixed", 1.0, "fp16", broker, run_dir)
            final = final_evaluation(s, base, Path(summary["adapter"]))
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            agents = [a for m in metrics[1:] for a in m["agents"].values()]
            tail = s.tail if split == "u" else 0
            cuts = range(1, layers - tail)
            steps: dict[str, dict[int, float]] = {}
            for speedup in SPEEDUPS:
                costs = CostModel(load_config(str(base)), _scaled(server, speedup))
                steps[f"{speedup:g}"] = {
                    c: mean_step_s(replay_split(s, base, fleet, costs, at_cut(metrics, c))) for c in cuts
                }
            results[split] = {
                "final_ppl": final["final_ppl"],
                "bytes_up_per_step": statistics.fmean(a["timings"]["bytes_up"] for a in agents),
                "bytes_down_per_step": statistics.fmean(a["timings"]["bytes_down"] for a in agents),
                "step_s": steps,
            }
            say(f"  final ppl {final['final_ppl']:.2f}; step at cut {s.fixed_cut}: {steps['100'][s.fixed_cut]:.3f} s")
    meta = {
        "command": " ".join(["python", "scripts/bench_usplit.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": cpu_name(),
        "base": str(base),
        "settings": dataclasses.asdict(settings),
        "calibration": calibration,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    text = report(meta, results, settings.fixed_cut)
    print(text)
    if args.write:
        write_section(args.write, "usplit", text)
    return 0


def _scaled(server: Server, speedup: float) -> Server:
    return Server(server.block_flops_per_s * speedup, server.head_flops_per_s * speedup)


def report(meta: dict[str, Any], results: dict[str, Any], cut: int) -> str:
    two, u = results["two-part"], results["u"]
    s = meta["settings"]
    lines = [
        "## The price of privacy: U-shaped split vs two-part split",
        "",
        f"`{meta['command']}` on {meta['host']}, {meta['date'][:10]}, {meta['wall_s'] / 60:.0f} min. The study's fleet",
        "(Jetson Nano, 2 x Orin Nano, Raspberry Pi 5, laptop; virtual emulation), its pretrained base, GSM8K at",
        f"alpha 1, {s['rounds']} rounds x {s['local_steps']} steps x batch {s['batch_size']}, AdamW lr {s['lr']:g}, rank "
        f"{s['r']}, fp16 wire; both runs at cut {cut}, the U run with a tail of {s['tail']} block(s). Step times are",
        "simulated (splitft.bench.clock) from the bytes each run sent; 'best cut' replays the same rounds with",
        "every device at each cut and takes the best in hindsight.",
        "",
        "| | two-part | U split | U / two-part |",
        "|---|---|---|---|",
    ]
    up_ratio = u["bytes_up_per_step"] / two["bytes_up_per_step"]
    down_ratio = u["bytes_down_per_step"] / two["bytes_down_per_step"]
    lines += [
        f"| bytes up per device step | {two['bytes_up_per_step']:,.0f} | {u['bytes_up_per_step']:,.0f} | {up_ratio:.2f} |",
        f"| bytes down per device step | {two['bytes_down_per_step']:,.0f} | {u['bytes_down_per_step']:,.0f} "
        f"| {down_ratio:.2f} |",
    ]
    for speedup in two["step_s"]:
        t2, tu = two["step_s"][speedup], u["step_s"][speedup]
        c2, cu = min(t2, key=lambda c: t2[c]), min(tu, key=lambda c: tu[c])
        lines += [
            f"| step at cut {cut}, server x{speedup} | {t2[cut]:.3f} s | {tu[cut]:.3f} s | {tu[cut] / t2[cut]:.2f} |",
            f"| best fixed cut, server x{speedup} | {t2[c2]:.3f} s (cut {c2}) | {tu[cu]:.3f} s (cut {cu}) "
            f"| {tu[cu] / t2[c2]:.2f} |",
        ]
    lines.append(
        f"| final perplexity (GSM8K test) | {two['final_ppl']:.2f} | {u['final_ppl']:.2f} "
        f"| {u['final_ppl'] / two['final_ppl']:.3f} |"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
