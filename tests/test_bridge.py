"""A site broker bridged to a central one: agents on the site's Mosquitto, the coordinator on the central
Mosquitto, the bridge forwarding ``splitft/v1/#`` both ways (OPERATIONS.md, "Site brokers"). The job runs
unchanged: every agent is admitted through the bridge, every step is answered, every round counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from splitft.agent.runtime import Agent, AgentSettings
from splitft.coordinator.brokers import start_mosquitto, stop_broker
from splitft.coordinator.runtime import Coordinator
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import write_shards
from splitft.shared.job.records import load_records
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings


def bridge_config(name: str, central_port: int) -> str:
    """The site broker's bridge to the central one, as in OPERATIONS.md (without TLS: both on loopback)."""
    return (
        f"connection {name}\naddress 127.0.0.1:{central_port}\nbridge_protocol_version mqttv50\n"
        "topic splitft/v1/# both 1\ncleansession true\nrestart_timeout 1\n"
    )


async def test_agents_on_a_bridged_site_broker(tmp_path: Path) -> None:
    central = start_mosquitto(tmp_path / "central")
    site = start_mosquitto(tmp_path / "site", extra_config=bridge_config("site-a", central.port))
    try:
        job = JobConfig(
            job="bridged", model="tiny-gpt2", rounds=2, local_steps=2, batch_size=2, max_length=48, cut=1,
            min_agents=2, eval_samples=4, join_timeout_s=60,
        )  # fmt: skip
        pairs = load_records(GSM8K / "train.jsonl", limit=16)
        shards = write_shards(pairs, 2, tmp_path / "shards", seed=0)
        coordinator = Coordinator(job, BrokerSettings(url=central.url), tmp_path / "out")
        agents = [
            Agent(AgentSettings(f"site-{i}", job.job, job.model, path), BrokerSettings(url=site.url))
            for i, path in enumerate(shards)
        ]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            await asyncio.wait_for(coordinator.run(), timeout=180)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        finally:
            for task in tasks:
                task.cancel()
        assert all(a.rounds_done == job.rounds for a in agents)
        metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        for m in metrics[1:]:
            assert set(m["agents"]) == {"site-0", "site-1"} and m["attempt"] == 1 and m["rejected"] == {}, m
            assert all(a["dropped"] is None and a["tokens"] > 0 for a in m["agents"].values()), m
    finally:
        stop_broker(site)
        stop_broker(central)
