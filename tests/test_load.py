"""Load: 50 agents in one fleet process against one coordinator, over a real Mosquitto on loopback.

The coordinator runs in this process; the 50 agents (tiny-gpt2, B=1, T<=32, cut 1) in one
``scripts/agent_fleet.py`` subprocess, all on one event loop, each with 8 GSM8K training records whose
prompt fits in 32 tokens (the fleet shards them: most GSM8K prompts are longer, and an agent left with
no example refuses its assignments). Every round must have every agent, every step answered, nothing
rejected, no round run twice, and the coordinator's memory must stay flat.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from splitft.coordinator.runtime import Coordinator
from splitft.shared.job.config import JobConfig
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings

from conftest import Broker

FLEET = Path(__file__).resolve().parent.parent / "scripts" / "agent_fleet.py"
AGENTS = 50
ROUNDS = 4
# Memory flat: growth from round 2 (after warm-up: the server's optimiser state, the first checkpoint,
# the estimates of every agent) to the last round, counted in what the coordinator holds, not in RSS.
# RSS is the allocator's view: on a 2-core VM, even with glibc's free memory returned first (malloc_trim),
# it swings by 10-12 MiB from one round to the next with the same Python objects and tensors alive, and
# the raw RSS of metrics.jsonl by up to 55 MiB (transient buffers, 6 MiB logits, adapters, that glibc
# keeps). What is alive is exact: measured over rounds 2-4, live tensor storage +0.0 MiB and the objects
# the garbage collector tracks +30 to +100 (one controller decision a round, the event loop's cancelled
# timers, which it drops in batches). A leak of per-round state (50 adapter sets, ~0.2 MiB each) shows in
# the tensor bytes; a leak of per-message state (150 activations and uploads a round, each at least a
# dict) in the object count. RSS keeps a coarse bound that catches a leak the heap census cannot see.
TENSOR_GROWTH_MIB = 1.0
OBJECT_GROWTH = 300  # one object per message of the two rounds measured
RAW_GROWTH_MIB = 64.0


def live_heap() -> tuple[int, float]:
    """(objects the garbage collector tracks, MiB of live tensor storage), after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated reduce_op object warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return len(objects), sum(storages.values()) / 2**20


def load_job(name: str) -> JobConfig:
    return JobConfig(
        job=name,
        model="tiny-gpt2",
        rounds=ROUNDS,
        local_steps=2,
        batch_size=1,
        max_length=32,
        cut=1,
        min_agents=AGENTS,
        eval_samples=4,
        join_timeout_s=180,
        join_window_s=0.2,
        step_timeout_s=120,
        min_step_timeout_s=120,  # the controller's deadlines must not undercut the generous ones on a busy VM
        upload_timeout_s=120,
    )


async def test_fifty_agents_in_one_fleet_every_step_answered(broker: Broker, tmp_path: Path) -> None:
    job = load_job("load")
    report = tmp_path / "fleet.json"
    fleet = await asyncio.create_subprocess_exec(
        sys.executable, str(FLEET), "--count", str(AGENTS), "--broker", broker.url, "--job", job.job,
        "--model", job.model, "--data-dir", str(GSM8K / "train.jsonl"), "--max-length", str(job.max_length),
        "--samples-per-agent", "8", "--prefix", "load-", "--timeout", "400", "--report", str(report),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = asyncio.create_task(fleet.communicate())
    out = tmp_path / "out"
    heap: dict[int, tuple[int, float]] = {}

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "round_end":  # after the round's metrics line (and its RSS) is written
            heap[data["round"]] = live_heap()

    # One torch thread for the server, as the fleet's agents have: a pool as wide as the machine spin-waits
    # against the fleet and the broker on the same cores (a 0.07 s server step took 0.2-8 s on a busy 2-core VM).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        coordinator = Coordinator(job, BrokerSettings(url=broker.url), out, progress=progress)
        await asyncio.wait_for(coordinator.run(), timeout=420)
        stdout, _ = await asyncio.wait_for(output, timeout=60)
    finally:
        torch.set_num_threads(threads)
        if fleet.returncode is None:
            fleet.kill()
            await fleet.wait()
    text = stdout.decode(errors="replace")
    assert fleet.returncode == 0, text[-4000:]

    names = {f"load-{i:02d}" for i in range(AGENTS)}
    fleet_report = json.loads(report.read_text())
    assert set(fleet_report["agents"]) == names
    for name, agent in fleet_report["agents"].items():
        # rounds_done counts rounds whose every step got its gradient and whose upload was sent
        assert agent["rounds_done"] == ROUNDS, (name, agent)
        assert agent["error"] is None and agent["notices"] == 0, (name, agent)
        assert not agent["link_rejected"] and not agent["rejected"], (name, agent)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))
    for m in metrics[1:]:
        assert m["attempt"] == 1, m["round"]
        assert m["rejected"] == {}, (m["round"], m["rejected"])
        assert set(m["agents"]) == names, m["round"]
        for name, a in m["agents"].items():
            assert a["dropped"] is None, (m["round"], name, a["dropped"])
            assert a["tokens"] > 0, (m["round"], name)  # the server trained on its batches
            # step_time_s is the time between an agent's two gradients: > 0 only if both steps were answered
            assert a["step_time_s"] > 0 and a["server_s"] > 0, (m["round"], name, a)
            assert a["bytes_up"] > 0 and a["bytes_down"] > 0, (m["round"], name)
    rss = {m["round"]: m["coordinator_rss_mb"] for m in metrics[1:]}
    assert rss[ROUNDS] - rss[2] < RAW_GROWTH_MIB, rss
    (objects_first, tensors_first), (objects_last, tensors_last) = heap[2], heap[ROUNDS]
    assert tensors_last - tensors_first < TENSOR_GROWTH_MIB, heap
    assert objects_last - objects_first < OBJECT_GROWTH, heap
