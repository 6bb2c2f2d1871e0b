"""Run many agents in ONE process and one event loop: the fleet of a load test.

    python scripts/agent_fleet.py --count 50 --broker mqtt://127.0.0.1:1883 --job load
    python scripts/agent_fleet.py --count 50 --data-dir shards/            # one shard file per agent
    python scripts/agent_fleet.py --count 50 --data-dir my.jsonl           # one file, sharded here

Each agent is a real :class:`splitft.agent.runtime.Agent` with its own id (``--prefix`` + a number),
its own MQTT connection, Last Will and data shard; they share the process, the event loop and the
machine's cores. The fleet exits 0 once every agent's ``run()`` returned (the job is done), 1 if any
agent failed, 2 if ``--timeout`` ran out or it was interrupted; either way it prints one summary line
(agents, rounds done per agent, rejections) and, with ``--report``, writes the same per agent as JSON.

``--data-dir`` is a folder with at least ``--count`` ``.jsonl``/``.csv`` files (agent ``i`` takes the
``i``-th in natural order: ``shard-2`` before ``shard-10``) or a single JSONL/CSV file, dealt here into
``--count`` shards with :func:`splitft.shared.job.data.write_shards`; the default is the vendored GSM8K
training split, ``--samples-per-agent`` records per agent. Give the job's ``--max-length``: tokenisation
drops the records whose prompt leaves no response token (at 32 tokens, 94% of GSM8K), an agent with no
record left refuses every assignment, and the coordinator learns it only at its step deadline. With
``--max-length`` a file is cut to the records that fit before it is sharded, and every shard is checked.

Per-agent cost. The process runs with one torch/OpenMP thread (``OMP_NUM_THREADS=1`` unless set):
every agent has its own compute thread, and each such thread with a pool as wide as the machine
would spin against all the others. An :class:`Agent` also loads the model's tokenizer and measures
the device's per-block time in its constructor (about 0.14 s and 12 MiB, and 0.2 s, each time, on a
2-core VM). Both give the same answer for every agent of one process on one machine, so the fleet
does each once and shares it (``--no-share`` turns that off): the tokenizer is only ever used on the
event loop's thread (tokenising a shard), never from two threads at once. Measured for 50 agents:
0.5 s and +15 MiB to build them shared, 12.1 s and +437 MiB not. Each agent's segment also held its own
copy of the model's frozen weights (about 49 MiB for tiny-gpt2 at cut 1, 24.5 MiB of it the token
embedding, 50,257 x 128 fp32): the fleet gives every segment the first one's tensors instead
(:func:`share_frozen_weights`; 20 segments built in one process: +65 MiB shared, +993 MiB not), so an agent
holds only its adapters, optimiser state, batches and activations, and 500 agents fit on this machine.

``--tcp-nodelay on|off`` is an experiment: it sets TCP_NODELAY on the agents' MQTT sockets or leaves it off
(``BrokerSettings.tcp_nodelay``, which is on by default; scripts/bench_load.py measures it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: see the module docstring

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psutil
import torch
import typer

from splitft.agent.profile import measure_block
from splitft.agent.runtime import Agent, AgentSettings, AgentTools
from splitft.shared.cli_options import check_choices, run_app
from splitft.shared.errors import SplitFTError
from splitft.shared.job.data import tokenize, write_shards
from splitft.shared.job.records import Record, load_records
from splitft.shared.model.memory import SHARED_PROCESS_RUNTIME_MB
from splitft.shared.model.split import Segment, build_segment
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.broker import broker_settings

log = logging.getLogger("agent_fleet")

EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2


@dataclass
class Outcome:
    name: str
    rounds_done: int
    link_rejected: dict[str, int]
    rejected: dict[str, int]
    notices: int
    error: str | None


def shared_tools() -> AgentTools:
    """The tools of this process's agents, sharing what gives every agent of one process the same answer.

    The tokenizer is loaded and a block measured once (memoised here: every agent gets the same tokenizer
    object and the same measurement), and the segments share one copy of the frozen weights
    (:func:`share_frozen_weights`). Nothing else changes.
    """
    return AgentTools(
        load_tokenizer=functools.cache(load_tokenizer),
        measure_block=functools.cache(measure_block),
        build_segment=share_frozen_weights(build_segment),
    )


def share_frozen_weights(build: Callable[..., Segment]) -> Callable[..., Segment]:
    """``build`` (a ``build_segment``) whose segments hold one copy of the model's frozen weights, not one each.

    Every frozen parameter of a new segment is replaced by the first segment's tensor of the same name and
    shape. The base never changes (only the LoRA adapters train, and they stay each agent's own), so sharing
    it changes no result; the agents' compute threads only read it. What an agent then holds is its
    adapters, optimiser state, batches and activations.
    """
    #: the frozen base weights of the segments built, one tensor per (name, shape, dtype, device)
    frozen: dict[tuple[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    @functools.wraps(build)
    def shared(*args: Any, **kwargs: Any) -> Segment:
        segment = build(*args, **kwargs)
        with torch.no_grad():
            for name, param in segment.peft_model.named_parameters():
                if param.requires_grad:
                    continue
                key = (name, tuple(param.shape), param.dtype, param.device)
                first = frozen.setdefault(key, param.data)
                if first is not param.data:
                    param.data = first
        return segment

    return shared


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def fitting(
    records: list[Record], model: str, max_length: int, load: Callable[[str], Any] = load_tokenizer
) -> list[Record]:
    """The records that leave something to learn at ``max_length`` tokens (the others are dropped by
    tokenisation: a shard of only such records gives its agent nothing to train on). ``load`` loads the
    tokenizer (the agents' own: :attr:`AgentTools.load_tokenizer`)."""
    tokenizer = load(model)
    return [record for record in records if tokenize([record], tokenizer, max_length)]


def shard_files(
    data: Path,
    count: int,
    samples_per_agent: int,
    work: Path,
    model: str,
    max_length: int | None,
    load: Callable[[str], Any] = load_tokenizer,
) -> list[Path]:
    """One data file per agent: the first ``count`` files of a folder, or ``data`` dealt into ``count`` shards.

    With ``max_length``, a file is first cut to the records that fit, and every shard is checked to hold
    at least one (an agent with none refuses every assignment, and the coordinator waits its step deadline).
    """
    if data.is_dir():
        files = sorted((p for p in data.iterdir() if p.suffix in (".jsonl", ".json", ".csv")), key=_natural)
        if len(files) < count:
            raise SystemExit(f"agent_fleet: {data} holds {len(files)} data files, {count} agents need one each")
        files = files[:count]
    elif data.is_file():
        records = load_records(data)
        if max_length is not None:
            records = fitting(records, model, max_length, load)
        if len(records) < count:
            raise SystemExit(f"agent_fleet: {data} has {len(records)} usable records, {count} agents need one each")
        files = write_shards(records[: count * samples_per_agent], count, work, seed=0)
    else:
        raise SystemExit(f"agent_fleet: --data-dir {data} is neither a folder nor a file")
    if max_length is not None:
        tokenizer = load(model)
        empty = [f.name for f in files if not tokenize(load_records(f), tokenizer, max_length)]
        if empty:
            raise SystemExit(f"agent_fleet: no record of {', '.join(empty)} fits in {max_length} tokens")
    return files


def agent_names(prefix: str, count: int) -> list[str]:
    width = len(str(count - 1))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


async def run_fleet(agents: list[Agent], timeout_s: float | None) -> tuple[dict[str, BaseException | None], bool]:
    """Run every agent until all returned; on ``timeout_s`` or SIGINT/SIGTERM cancel the rest (they say goodbye).

    Returns each agent's exception (None: its run() returned) and whether the fleet was stopped early.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tasks: dict[asyncio.Task[Any], str] = {asyncio.create_task(a.run(), name=a.name): a.name for a in agents}
    stopper = asyncio.create_task(stop.wait())
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending: set[asyncio.Task[Any]] = set(tasks)
    stopped = False
    while pending:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done, _ = await asyncio.wait(pending | {stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        pending -= done
        for task in done:
            if task is not stopper and task.exception() is not None:
                log.error("agent %s failed: %r", tasks[task], task.exception())
        if stopper in done or not done:
            stopped = True
            log.error("stopping the fleet: %s", "interrupted" if stopper in done else f"--timeout {timeout_s:g} s")
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            break
    stopper.cancel()
    errors: dict[str, BaseException | None] = {}
    for task, name in tasks.items():
        if task.cancelled():
            errors[name] = asyncio.CancelledError("stopped before the job was done")
        else:
            errors[name] = task.exception()
    return errors, stopped


def outcomes(agents: list[Agent], errors: dict[str, BaseException | None]) -> list[Outcome]:
    result = []
    for a in agents:
        link = a.link  # the agent's Link stays referenced after run(): its counters are final
        error = errors.get(a.name)
        result.append(
            Outcome(
                name=a.name,
                rounds_done=a.rounds_done,
                link_rejected=dict(link.rejected) if link is not None else {},
                rejected=dict(a.rejected),
                notices=len(a.notices),
                error=None if error is None else f"{type(error).__name__}: {error}",
            )
        )
    return result


def summary_line(results: list[Outcome], seconds: float, rss_start_mb: float, peak_mb: float) -> str:
    rounds = Counter(o.rounds_done for o in results)
    link_rejected = sum(sum(o.link_rejected.values()) for o in results)
    rejected = sum(sum(o.rejected.values()) for o in results)
    failed = sum(o.error is not None for o in results)
    per_agent_mb = (peak_mb - rss_start_mb) / max(len(results), 1)
    rounds_text = (
        str(next(iter(rounds)))
        if len(rounds) == 1
        else ", ".join(f"{n} agents {r}" for r, n in sorted(rounds.items(), reverse=True))
    )
    return (
        f"fleet: {len(results)} agents, {len(results) - failed} finished, {failed} failed; "
        f"rounds done per agent: {rounds_text}; link rejections: {link_rejected}; body rejections: {rejected}; "
        f"notices: {sum(o.notices for o in results)}; {seconds:.1f} s; "
        f"rss {rss_start_mb:.0f} MiB before the agents, peak {peak_mb:.0f} MiB ({per_agent_mb:.1f} MiB per agent)"
    )


app = typer.Typer(add_completion=False)


@app.command(help=__doc__)
def fleet(
    count: Annotated[int, typer.Option("--count", min=1, help="agents to run")],
    broker_url: Annotated[str, typer.Option("--broker", help="broker URL")] = "mqtt://127.0.0.1:1883",
    job: Annotated[str, typer.Option("--job", help="job name, as in the coordinator's job file")] = "splitft",
    model: Annotated[str, typer.Option("--model", help="preset or model folder")] = "tiny-gpt2",
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            show_default=False,
            help="a folder of one data file per agent, or one JSONL/CSV file to shard (default: GSM8K train)",
        ),
    ] = GSM8K / "train.jsonl",
    samples_per_agent: Annotated[
        int, typer.Option("--samples-per-agent", min=1, help="records per agent when sharding a file")
    ] = 16,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length",
            help="the job's max_length: shard only records that fit in it, and check every shard has one",
        ),
    ] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="agent ids are PREFIX + a number")] = "fleet-",
    auth_key_file: Annotated[
        Path | None, typer.Option("--auth-key-file", help="the job's message authentication key, if it uses one")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="give up (exit 2) after this many seconds")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="write per-agent results as JSON here")] = None,
    no_share: Annotated[
        bool,
        typer.Option(
            "--no-share",
            help="every agent loads its own tokenizer, measures, and holds its own copy of the frozen weights",
        ),
    ] = False,
    tcp_nodelay: Annotated[
        str | None,
        typer.Option("--tcp-nodelay", help="on or off; experiment: force TCP_NODELAY on the agents' MQTT sockets"),
    ] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="-v: info, -vv: debug")] = 0,
) -> int:
    check_choices("--tcp-nodelay", tcp_nodelay, ("on", "off"))
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    process = psutil.Process()
    try:
        broker = broker_settings(broker_url, auth_key_file=auth_key_file)
    except SplitFTError as exc:
        raise typer.BadParameter(str(exc)) from exc
    tools = AgentTools() if no_share else shared_tools()
    if tcp_nodelay is not None:
        broker = dataclasses.replace(broker, tcp_nodelay=tcp_nodelay == "on")
    with tempfile.TemporaryDirectory(prefix="splitft-fleet-") as work:
        files = shard_files(data_dir, count, samples_per_agent, Path(work), model, max_length, tools.load_tokenizer)
        rss_start_mb = process.memory_info().rss / 2**20
        names = agent_names(prefix, count)
        try:
            agents = [
                Agent(AgentSettings(n, job, model, f, runtime_mb=SHARED_PROCESS_RUNTIME_MB), broker, tools=tools)
                for n, f in zip(names, files, strict=True)
            ]
        except SplitFTError as exc:
            print(f"agent_fleet: cannot start the agents: {exc}", file=sys.stderr)
            return EXIT_FAILED
        log.info(
            "%d agents built in %.1f s (rss %.0f MiB, %d torch thread(s))",
            len(agents), time.monotonic() - started, process.memory_info().rss / 2**20, torch.get_num_threads(),
        )  # fmt: skip
        errors, stopped = asyncio.run(run_fleet(agents, timeout))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    results = outcomes(agents, errors)
    print(summary_line(results, time.monotonic() - started, rss_start_mb, peak_mb), flush=True)
    if report_path is not None:
        report = {
            "agents": {o.name: {k: v for k, v in vars(o).items() if k != "name"} for o in results},
            "stopped": stopped,
            "seconds": round(time.monotonic() - started, 3),
            "rss_start_mb": round(rss_start_mb, 1),
            "peak_rss_mb": round(peak_mb, 1),
        }
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    if stopped:
        return EXIT_TIMEOUT
    return EXIT_FAILED if any(o.error is not None for o in results) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/agent_fleet.py``: run the fleet; returns its exit code (EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT; 2 also
    for a bad command line)."""
    return run_app(app, argv)
