#!/usr/bin/env python3
"""The batched server segment against the per-device path: one global step of 16 devices, each a batch of
4 x 256 tokens, on the server (forward from each device's cut, loss, backward, one optimiser step).

* per device: ``ServerModel.train_on`` once per device (a merged pass of one: the runtime without ``server_batching``), then ``finish_step``;
* batched: ``ServerModel.train_batch`` (every device's batch merged, the shallower cuts joining at the
  deeper ones), then ``finish_step``; also under a cap of ``--cap`` tokens per pass.

Both paths start from the same adapters and take the same batches; the step is repeated ``--repeats``
times per path, the paths alternating, and the median is reported. Throughput = the step's tokens
(rows x length) / its wall time. The results' largest relative difference (the gradients sent to the
devices) is reported next to it.

    python scripts/bench_batching.py                        # tiny-gpt2 and tiny-llama, mixed cuts and cut 1
    python scripts/bench_batching.py --write BENCHMARKS.md  # and replace the "batching" section
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.server import BatchItem, ServerModel
from splitft.shared.job.config import JobConfig, OptimizerSettings
from splitft.shared.wire.messages import Activations


def items(model: ServerModel, cuts: list[int], rows: int, length: int) -> list[BatchItem]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, cut in enumerate(cuts):
        labels = torch.randint(0, model.vocab_size, (rows, length), generator=gen)
        labels[:, : length // 3] = -100  # the prompt: no loss there
        hidden = torch.randn(rows, length, model.hidden_size, generator=gen)
        out.append(BatchItem(f"d{i:02d}", cut, Activations(hidden, labels, torch.full((rows,), length), {})))
    return out


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(name: str, cuts: list[int], rows: int, length: int, args: argparse.Namespace) -> dict[str, object]:
    job = JobConfig(model=name, max_length=length, optimizer=OptimizerSettings(name="sgd", lr=1e-6))
    server = ServerModel(job, sorted(set(cuts)))
    batch = items(server, cuts, rows, length)

    def per_device() -> None:
        for item in batch:
            server.train_on(item.cut, item.act, item.agent)
        server.finish_step()

    def merged(cap: int) -> None:
        server.train_batch(batch, max_tokens=cap)
        server.finish_step()

    alone = {i.agent: server.train_on(i.cut, i.act, i.agent) for i in batch}
    server.discard_step()
    together = server.train_batch(batch)
    server.discard_step()
    diff = max(float((together[a].grad - r.grad).abs().max() / r.grad.abs().max()) for a, r in alone.items())
    times: dict[str, list[float]] = {"per device": [], "batched": [], f"batched, cap {args.cap}": []}
    per_device(), merged(0)  # warm-up
    for _ in range(args.repeats):
        times["per device"].append(timed(per_device))
        times["batched"].append(timed(lambda: merged(0)))
        times[f"batched, cap {args.cap}"].append(timed(lambda: merged(args.cap)))
    tokens = len(cuts) * rows * length
    median = {k: statistics.median(v) for k, v in times.items()}
    shape = f"{len(cuts)} x {rows} x {length}"
    return {"model": name, "cuts": cuts, "shape": shape, "median": median, "tokens": tokens, "diff": diff}


def report(args: argparse.Namespace, runs: list[dict[str, object]]) -> str:
    lines = [
        "## The batched server segment",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()} ({torch.get_num_threads()} torch threads), one global "
        f"step of devices x rows x tokens each (fp32), median of {args.repeats} alternating repeats. Command: "
        f"`python scripts/bench_batching.py --shapes {args.shapes} --write BENCHMARKS.md`.",
        "",
        "| model | devices x rows x tokens | cuts | path | step s | tokens/s | vs per device | largest relative difference |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        median: dict[str, float] = run["median"]  # type: ignore[assignment]
        base = median["per device"]
        cuts = run["cuts"]
        shown = "1 for all" if set(cuts) == {1} else f"{min(cuts)}..{max(cuts)} mixed"  # type: ignore[arg-type]
        for path, seconds in median.items():
            diff = f"{run['diff']:.1e}" if path == "batched" else ""
            lines.append(
                f"| {run['model']} | {run['shape']} | {shown} | {path} | {seconds:.3f} | {run['tokens'] / seconds:,.0f} | "  # type: ignore[operator]
                f"{base / seconds:.2f}x | {diff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", default="16x4x256,50x1x32", help="devices x rows x tokens of a step, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap", type=int, default=4096, help="tokens per pass in the capped variant")
    parser.add_argument("--models", default="tiny-gpt2,tiny-llama")
    parser.add_argument("--write", type=Path, help="replace the 'batching' section of this markdown file")
    args = parser.parse_args()
    runs = []
    for shape in args.shapes.split(","):
        devices, rows, length = (int(x) for x in shape.split("x"))
        for name in args.models.split(","):
            for cuts in ([1 + i % 4 for i in range(devices)], [1] * devices):
                runs.append(measure(name, cuts, rows, length, args))
                print(runs[-1], flush=True)
    text = report(args, runs)
    print(text)
    if args.write:
        write_section(args.write, "batching", text)


if __name__ == "__main__":
    main()
