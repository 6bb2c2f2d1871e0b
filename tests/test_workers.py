"""Several coordinator workers (torch.distributed, gloo): the devices sharded over the ranks, the server's
gradients all-reduced; the same adapters as one coordinator; a worker killed mid-round is survived."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runtime import equivalence_job, read_metrics, run_job, shards
from typer.testing import CliRunner

from splitft.coordinator.brokers import free_port
from splitft.coordinator.cli import app
from splitft.coordinator.runtime import Coordinator
from splitft.coordinator.workers import WorkerGroup, assign_ranks, start_local_workers, stop_local_workers
from splitft.shared.errors import ConfigError, ExitCode
from splitft.shared.job.config import JobConfig
from splitft.shared.model.lora import lora_state

from conftest import Broker

runner = CliRunner()


def test_assign_ranks_keeps_agents_in_place_and_evens_the_load() -> None:
    first = assign_ranks(["a", "b", "c", "d", "e"], 2, {})
    assert sorted(first.values()).count(0) in (2, 3) and set(first.values()) == {0, 1}
    # One leaves, one joins: the others stay where they were.
    again = assign_ranks(["a", "b", "c", "e", "f"], 2, first)
    assert all(again[n] == first[n] for n in ("a", "b", "c", "e"))
    # A rank that no longer exists (a worker lost): its agents move; counts stay at most one apart.
    alone = assign_ranks(["a", "b", "c"], 1, {"a": 0, "b": 1, "c": 1})
    assert alone == {"a": 0, "b": 0, "c": 0}
    skewed = assign_ranks([f"x{i}" for i in range(6)], 3, dict.fromkeys([f"x{i}" for i in range(6)], 0))
    assert sorted(list(skewed.values()).count(r) for r in range(3)) == [2, 2, 2]


def test_bad_worker_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        WorkerGroup(0, 2, "nohost")
    with pytest.raises(ConfigError, match="--rank"):
        WorkerGroup(2, 2, "127.0.0.1:1234")
    with pytest.raises(ConfigError, match="at least 2"):
        WorkerGroup(0, 1, "127.0.0.1:1234")
    # On the command line: exit code 3 and the option named, before anything connects or is written.
    nowhere = ["--broker", "mqtt://127.0.0.1:9", "--connect-timeout", "1"]
    result = runner.invoke(app, ["worker", *nowhere, "--rendezvous", "nohost", "--rank", "1", "--workers", "2"])
    assert result.exit_code == ExitCode.CONFIG and "--rendezvous must look like HOST:PORT" in result.output
    result = runner.invoke(app, ["worker", *nowhere, "--rendezvous", "127.0.0.1:5", "--rank", "2", "--workers", "2"])
    assert result.exit_code == ExitCode.CONFIG and "--rank must be in 0..1" in result.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", *nowhere, "--out", str(out), "--rendezvous", "127.0.0.1:5"])
    assert result.exit_code == ExitCode.CONFIG and "--rendezvous is for --workers 2 or more" in result.output
    assert not out.exists()


async def run_with_workers(
    broker: Broker, out: Path, job: JobConfig, data: dict[str, Path], world: int, on_progress: Any = None
) -> tuple[Coordinator, list[Any]]:
    """``job`` with this process as rank 0 and ranks 1.. as `splitft-coordinator worker` processes."""
    address = f"127.0.0.1:{free_port()}"
    procs = start_local_workers(world, address, ["--broker", broker.url, "--device", "cpu", "--worker-timeout", "120"])
    progress = (lambda event, body: on_progress(event, body, procs)) if on_progress else None
    group = WorkerGroup(0, world, address, timeout_s=120)
    try:
        coordinator = await run_job(broker, out, job, data, progress=progress, workers=group, worker_processes=procs)
    finally:
        await asyncio.to_thread(stop_local_workers, procs)
    return coordinator, procs


def two_worker_job(name: str) -> JobConfig:
    """Plain SGD over four agents cut at 1, 2, 3, 2; two local steps, so the all-reduce runs twice a round."""
    base = equivalence_job(name)
    return replace(base, rounds=2, local_steps=2, min_agents=4, cuts={**base.cuts, "a4": 2})


@pytest.mark.parametrize("split", ["two-part", "u"])
async def test_two_workers_give_the_adapters_of_one(broker: Broker, tmp_path: Path, split: str) -> None:
    data = shards(tmp_path, n=4, samples=64)
    job = replace(two_worker_job("workers"), split=split)
    one = await run_job(broker, tmp_path / "one", job, data)
    two, procs = await run_with_workers(broker, tmp_path / "two", replace(job, job="workers2"), data, 2)
    assert all(p.returncode == 0 for p in procs)  # the worker ended with the job
    assert one.server is not None and two.server is not None
    expected, got = lora_state(one.server.segment.peft_model), lora_state(two.server.segment.peft_model)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    metrics = read_metrics(tmp_path / "two")
    for record in metrics[1:]:  # each worker served two of the four agents, none dropped
        workers = sorted(a["worker"] for a in record["agents"].values())
        assert workers == [0, 0, 1, 1]
        assert all(a["dropped"] is None and a["tokens"] > 0 and a["server_s"] > 0 for a in record["agents"].values())
    single = read_metrics(tmp_path / "one")
    for a, b in zip(single[1:], metrics[1:], strict=True):  # each agent's figures, whichever rank served it
        for name, agent in a["agents"].items():
            assert b["agents"][name]["tokens"] == agent["tokens"]
            for key in ("bytes_up", "bytes_down"):  # (the envelopes' ids differ: compressed, a few bytes)
                assert b["agents"][name][key] == pytest.approx(agent[key], rel=0.01), key
    for a, b in zip(single[1:], metrics[1:], strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6)
        assert b["train_tokens"] == a["train_tokens"]
    assert single[-1]["eval_loss"] < single[0]["eval_loss"]  # the job trained: the comparison is not vacuous


async def test_a_worker_killed_mid_round_rolls_the_round_back(broker: Broker, tmp_path: Path) -> None:
    data = shards(tmp_path, n=4, samples=64)
    job = replace(two_worker_job("killed"), local_steps=3)
    events: list[tuple[str, dict[str, Any]]] = []

    def kill_after_first_step(event: str, body: dict[str, Any], procs: list[Any]) -> None:
        events.append((event, body))
        if event == "step" and body["round"] == 1 and body["step"] == 1 and procs[0].poll() is None:
            os.kill(procs[0].pid, signal.SIGKILL)

    coordinator, procs = await run_with_workers(broker, tmp_path / "out", job, data, 2, kill_after_first_step)
    assert procs[0].returncode == -signal.SIGKILL
    lost = [body for event, body in events if event == "worker_lost"]
    assert len(lost) == 1 and lost[0]["round"] == 1
    retries = [body for event, body in events if event == "round_retry"]
    assert retries == [{"round": 1, "attempt": 1, "reason": "worker_lost"}]
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[1]["attempt"] == 2
    for record in metrics[1:]:  # every device back, on rank 0, none dropped
        assert sorted(record["agents"]) == sorted(data)
        assert all(a["worker"] == 0 and a["dropped"] is None for a in record["agents"].values())
    assert coordinator.group is None
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
