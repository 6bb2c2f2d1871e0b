"""The one-command local run: a broker, the coordinator and several agent processes on this machine.

Each agent is a real ``splitft-agent join`` process with its own shard of the data, talking to the
coordinator through a real MQTT broker: the embedded amqtt broker on 127.0.0.1 (MQTT 3.1.1) unless
an external broker URL is given. Agent logs go to ``<out>/logs/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from splitft.coordinator.progress import Progress
from splitft.coordinator.report import plot_run
from splitft.coordinator.runtime import Coordinator
from splitft.coordinator.workers import WorkerGroup, start_local_workers, stop_local_workers
from splitft.shared.errors import ConfigError, LinkError
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import write_shards
from splitft.shared.job.partition import length_dirichlet_partition, plot_partition, token_lengths, write_partition
from splitft.shared.job.records import load_records
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.sealed import make_fleet_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRun:
    job: JobConfig
    out: Path
    agents: int = 3
    cuts: tuple[int, ...] = (1, 2, 3)  # cut layer of agent i is cuts[i % len(cuts)]
    samples_per_agent: int = 96
    alpha: float | None = 1.0  # length-based Dirichlet partition; None: an IID split
    data: Path | None = None  # JSONL/CSV to shard; default: the vendored GSM8K train split
    prompt_field: str | None = None  # data's fields (default: the first known pair, see shared/job/data.py)
    response_field: str | None = None
    broker_url: str | None = None  # an external broker; default: the embedded one
    mqtt_protocol: str = "5"  # for an external broker
    device: str = "cpu"
    emulate: tuple[str, ...] = ()  # device profiles, given to the agents in turn (none: run at host speed)
    emulate_scale: float = 1.0
    emulate_virtual: bool = False  # agents report their profiles' times without waiting (agent/emulation.py)
    workers: int = 1  # coordinator workers (coordinator/workers.py): ranks 1.. started here as processes
    device_dtype: str | None = None  # every agent's base dtype (None: each emulated profile's, else fp32)
    # How much lower the agents' CPU priority is than this process's (a POSIX nice increment, 0-19). A fleet's
    # devices compute on CPUs of their own; on one machine, 19 gives the coordinator's compute the cores first
    # (a benchmark of the split's own overhead, without the emulated devices taking the server's cores).
    agent_nice: int = 0

    def __post_init__(self) -> None:
        if self.agents < 1:
            raise ConfigError(f"agents must be at least 1, got {self.agents}")
        if not self.cuts:
            raise ConfigError("cuts must list at least one cut layer")
        if self.samples_per_agent < 1:
            raise ConfigError(f"samples_per_agent must be at least 1, got {self.samples_per_agent}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if not 0 <= self.agent_nice <= 19:
            raise ConfigError(
                f"agent_nice must be 0 (as this process) to 19 (the lowest priority), got {self.agent_nice}"
            )
        if self.agent_nice and os.name != "posix":
            raise ConfigError("agent_nice is a POSIX process priority; this system has none")

    def agent_names(self) -> list[str]:
        return [f"agent-{i + 1}" for i in range(self.agents)]


def write_agent_data(run: LocalRun) -> list[Path]:
    """Shard the run's data among its agents, as :func:`run_local` does first: ``out/data/<agent>.jsonl``, one
    per agent in the order of :meth:`LocalRun.agent_names` (the same files for the same run, every time)."""
    run.out.mkdir(parents=True, exist_ok=True)
    source = run.data or GSM8K / "train.jsonl"
    records = load_records(source, run.prompt_field, run.response_field, limit=run.agents * run.samples_per_agent)
    if run.alpha is None:
        written = write_shards(records, run.agents, run.out / "data", seed=run.job.seed, prefix="shard")
    else:
        # Devices differ in how long their sequences are, as in a real fleet (see shared/job/partition.py).
        lengths = token_lengths(records, load_tokenizer(run.job.model), run.job.chat_template)
        partition = length_dirichlet_partition(lengths, run.agents, run.alpha, seed=run.job.seed)
        written = write_partition(records, partition, run.out / "data", prefix="shard")
        plot_partition(partition, lengths, run.out / "partition.png", title=f"Length-Dirichlet alpha={run.alpha}")
    names = run.agent_names()
    return [shard.replace(shard.with_name(f"{name}.jsonl")) for name, shard in zip(names, written, strict=True)]


async def run_local(run: LocalRun, progress: Progress | None = None) -> dict[str, Any]:
    """Shard the data, start the broker and the agents, run the job; returns the coordinator's summary
    plus the plot's path."""
    names = run.agent_names()
    shards = write_agent_data(run)
    cuts = {name: run.cuts[i % len(run.cuts)] for i, name in enumerate(names)}
    job = replace(run.job, cuts={**run.job.cuts, **cuts}, min_agents=run.agents)

    async with _broker(run) as (url, protocol):
        settings = BrokerSettings(url=url, protocol=protocol)
        processes: list[subprocess.Popen[bytes]] = []
        workers: list[subprocess.Popen[bytes]] = []
        group = None
        try:
            if run.workers > 1:
                address = f"127.0.0.1:{_free_port()}"
                args = ["--broker", url, "--mqtt-protocol", protocol, "--device", run.device]
                workers = start_local_workers(run.workers, address, args)
                group = WorkerGroup(0, run.workers, address)
            for name, shard in zip(names, shards, strict=True):
                processes.append(_start_agent(run, job, name, shard, url, protocol))
            coordinator = Coordinator(
                job, settings, run.out, device=run.device, progress=progress, workers=group, worker_processes=workers
            )
            summary = await coordinator.run()
            await _wait_agents(processes, timeout_s=60)
        finally:
            await asyncio.to_thread(stop_processes, processes)  # the embedded broker keeps serving meanwhile
            await asyncio.to_thread(stop_local_workers, workers)
    summary["plot"] = str(
        plot_run(run.out / "metrics.jsonl", run.out / "run.png", title=f"SplitFT local run: {job.job}")
    )
    summary["agents"] = {name: cuts[name] for name in names}
    return summary


@contextlib.asynccontextmanager
async def _broker(run: LocalRun) -> AsyncIterator[tuple[str, str]]:
    if run.broker_url is not None:
        yield run.broker_url, run.mqtt_protocol
        return
    from amqtt.broker import Broker

    port = _free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    try:
        await broker.start()
    except Exception as exc:  # amqtt raises its own and OS errors alike
        raise LinkError(f"could not start the embedded broker on 127.0.0.1:{port}: {exc}") from exc
    log.info("embedded MQTT broker on 127.0.0.1:%d", port)
    try:
        yield f"mqtt://127.0.0.1:{port}", "3.1.1"
    finally:
        await broker.shutdown()


#: a local run's fleet key (private adapters), made in its output folder for its agents
FLEET_KEY_FILE = "fleet.key"


def _start_agent(
    run: LocalRun, job: JobConfig, name: str, data: Path, url: str, protocol: str
) -> subprocess.Popen[bytes]:
    logs = run.out / "logs"
    logs.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "splitft.agent.cli", "--verbose", "join",
        "--broker", url, "--mqtt-protocol", protocol, "--job", job.job, "--id", name,
        "--data", str(data), "--model", job.model, "--device", run.device,
    ]  # fmt: skip
    if run.emulate:
        index = run.agent_names().index(name)
        command += ["--emulate", run.emulate[index % len(run.emulate)], "--emulate-scale", str(run.emulate_scale)]
        if run.emulate_virtual:
            command.append("--emulate-virtual")
    if run.device_dtype is not None:
        command += ["--dtype", run.device_dtype]
    if job.private_adapters:  # the devices' key, made for this run; the coordinator never opens it
        key = run.out / FLEET_KEY_FILE
        if not key.exists():
            make_fleet_key(key)
        command += ["--fleet-key-file", str(key)]
    with (logs / f"{name}.log").open("wb") as log_file:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if run.agent_nice:
        # Linux keeps a priority per thread: set now, while the new interpreter has one thread, every thread
        # it starts later (torch's among them) inherits it.
        os.setpriority(
            os.PRIO_PROCESS, process.pid, min(19, os.getpriority(os.PRIO_PROCESS, process.pid) + run.agent_nice)
        )
    return process


async def _wait_agents(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while any(p.poll() is None for p in processes) and loop.time() < deadline:
        await asyncio.sleep(0.2)
    failed = [p.args for p in processes if p.returncode not in (0, None)]
    if failed:
        log.warning("%d agent process(es) exited with an error; see the logs folder", len(failed))


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float = 10) -> None:
    """End processes this run started (by their pids), politely first: SIGTERM, then SIGKILL after ``timeout_s``."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
