"""Private adapters: the client blocks below c_min travel sealed with a fleet key the coordinator does not hold,
and the devices average them. Through a real Mosquitto, real agents and the real coordinator."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
import torch
from safetensors.torch import load_file
from test_runtime import run_job, shards, small_job
from typer.testing import CliRunner

from splitft.agent.cli import app as agent_app
from splitft.agent.runtime import Agent, AgentSettings
from splitft.coordinator.cli import app
from splitft.coordinator.private import PRIVATE_FILE
from splitft.coordinator.runtime import Coordinator
from splitft.shared.errors import ConfigError, Refusal, WireError
from splitft.shared.model.aggregation import Contribution, aggregate
from splitft.shared.model.lora import block_of, lora_state
from splitft.shared.model.memory import SHARED_PROCESS_RUNTIME_MB
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import decode_state
from splitft.shared.wire.envelope import decode_envelope
from splitft.shared.wire.sealed import (
    SealedUpload,
    associated,
    average_sealed,
    load_fleet_key,
    make_fleet_key,
    open_sealed,
    seal,
)
from splitft.shared.wire.topics import Kind, Topics

from conftest import Broker

runner = CliRunner()

# --------------------------------------------------------------------------- the seal


def test_a_sealed_adapter_opens_only_with_its_key_job_round_and_agent(tmp_path: Path) -> None:
    key = load_fleet_key(make_fleet_key(tmp_path / "fleet.key"))
    assert stat.S_IMODE(os.stat(tmp_path / "fleet.key").st_mode) == 0o600
    state = {"m.layers.0.q.lora_A.weight": torch.randn(4, 8), "m.layers.0.q.lora_B.weight": torch.randn(8, 4)}
    blob = seal(key, state, associated("job", 3, "a1"))
    assert all(state[n].numpy().tobytes() not in blob for n in state)  # no tensor in clear
    opened = open_sealed(key, blob, associated("job", 3, "a1"))
    assert all(torch.equal(opened[n], state[n]) for n in state)
    for other_key, aad in (
        (os.urandom(32), associated("job", 3, "a1")),  # another fleet
        (key, associated("job", 3, "a2")),  # replayed as another device's
        (key, associated("job", 4, "a1")),  # replayed in another round
    ):
        with pytest.raises(WireError) as caught:
            open_sealed(other_key, blob, aad)
        assert caught.value.reason == Refusal.UNAUTHENTICATED
    with pytest.raises(ConfigError, match="never overwritten"):
        make_fleet_key(tmp_path / "fleet.key")
    (tmp_path / "short.key").write_text("ab" * 16)
    with pytest.raises(ConfigError, match=r"at least 32|expected 32"):
        load_fleet_key(tmp_path / "short.key")


def test_the_devices_average_is_the_coordinators() -> None:
    key = os.urandom(32)
    gen = torch.Generator().manual_seed(0)
    name = "m.layers.0.q"
    states = [
        {f"{name}.lora_A.weight": torch.randn(r, 8, generator=gen), f"{name}.lora_B.weight": torch.randn(8, r, generator=gen)}
        for r in (4, 4, 2)  # one holder at another rank: the products are averaged and re-factorised
    ]  # fmt: skip
    weights = [10.0, 30.0, 5.0]
    uploads = [
        SealedUpload(f"a{i}", 2, w, seal(key, s, associated("job", 2, f"a{i}")))
        for i, (w, s) in enumerate(zip(weights, states, strict=True))
    ]
    devices = average_sealed(key, "job", uploads, {name: 4}, seed=3)
    coordinator = aggregate([Contribution(w, s) for w, s in zip(weights, states, strict=True)], {name: 4}, seed=3)
    assert devices.keys() == coordinator.keys() and all(torch.equal(devices[n], coordinator[n]) for n in devices)
    # A blob that does not open (forged, damaged, another fleet's) is left out, alike on every device.
    forged = [*uploads[:2], replace(uploads[2], blob=uploads[2].blob[:-1] + b"x")]
    first_two = aggregate([Contribution(w, s) for w, s in zip(weights[:2], states[:2], strict=True)], {name: 4}, seed=3)
    left_out = average_sealed(key, "job", forged, {name: 4}, seed=3)
    assert all(torch.equal(left_out[n], first_two[n]) for n in first_two)
    with pytest.raises(WireError, match="no sealed adapter"):
        average_sealed(os.urandom(32), "job", uploads, {name: 4}, seed=3)


# --------------------------------------------------------------------------- a job


async def test_private_adapters_never_reach_the_coordinator_and_train_exactly_as_plain(
    broker: Broker, tmp_path: Path
) -> None:
    """The same job twice, plain and with private adapters (c_min = 1: block 0; cuts 1, 2, 3, so block 0 has two
    ranks and its average is re-factorised). A listener on the broker sees every message of the private job: no
    upload carries block 0 in clear, no assignment after the first round does. The coordinator's copy of block 0
    and its checkpoints stay at the initial adapters; the exported adapter, completed with the fleet key, equals
    the plain job's bit for bit."""
    data = shards(tmp_path)
    plain_job = replace(small_job("plain", 3), c_min=1)
    private_job = replace(small_job("private", 3), c_min=1, private_adapters=True)
    key_file = make_fleet_key(tmp_path / "fleet.key")
    plain = await run_job(broker, tmp_path / "plain", plain_job, data)

    heard: list[tuple[str, dict[str, object], int | None]] = []

    async def listen() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.subscribe(f"{Topics(private_job.job).prefix}/#", qos=1)
            async for message in raw.messages:
                if isinstance(message.payload, bytes) and message.payload:
                    env = decode_envelope(message.payload)
                    heard.append((str(message.topic).rsplit("/", 1)[-1], dict(env.body), env.round))

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.5)
    try:
        private = await run_job(broker, tmp_path / "private", private_job, data, fleet_key=load_fleet_key(key_file))
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)

    uploads = [(body, r) for kind, body, r in heard if kind == Kind.ADAPTER]
    assigns = [(body, r) for kind, body, r in heard if kind == Kind.ASSIGN]
    assert len(uploads) == 9 and len(assigns) == 9  # 3 agents x 3 rounds
    for body, _ in uploads:  # block 0 never in clear (a1, cut 1, uploads nothing else in clear)
        assert all(block_of(n) >= 1 for n in decode_state(body["adapter"]))
        assert isinstance(body["sealed"], bytes)
    assert sum(len(decode_state(body["adapter"])) for body, _ in uploads) > 0
    for body, round_ in assigns:
        names = decode_state(body["adapter"]).keys()
        assert body["private"] == 1 and len(body["sealed"]) == (0 if round_ == 1 else 3)  # type: ignore[arg-type]
        assert all(block_of(n) >= 1 for n in names) or round_ == 1  # round 1: the public initial adapters

    assert private.server is not None and plain.server is not None
    initial = {n: t for n, t in lora_state(private.server.segment.peft_model).items() if block_of(n) == 0}
    start = build_segment(
        private_job.model, SegmentSpec.whole(12), lora=private_job.lora, ranks=private.server.ranks,
        lora_seed=private_job.seed,
    )  # fmt: skip
    start_state = lora_state(start.peft_model)
    assert initial and all(torch.equal(t, start_state[n]) for n, t in initial.items())
    for checkpoint in (tmp_path / "private" / "checkpoints").glob("round-*"):
        saved = load_file(checkpoint / "adapter.safetensors")
        assert all(torch.equal(saved[n], start_state[n]) for n in saved if block_of(n) == 0)

    exported = tmp_path / "private" / "adapter"
    assert (exported / PRIVATE_FILE).is_file()
    done = runner.invoke(
        app, ["unseal", "--adapter", str(exported), "--fleet-key-file", str(key_file), "--out", str(tmp_path / "whole")]
    )
    assert done.exit_code == 0, done.output
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == reference.keys()
    differing = [n for n in whole if not torch.equal(whole[n], reference[n])]
    assert not differing, f"{len(differing)} tensors differ from the plain run, e.g. {differing[:2]}"
    private_block = [n for n in whole if block_of(n) == 0 and ".lora_B." in n]
    assert any(float(whole[n].abs().sum()) > 0 for n in private_block)  # trained, not the initial zeros

    wrong = tmp_path / "wrong.key"
    make_fleet_key(wrong)
    refused = runner.invoke(
        app, ["unseal", "--adapter", str(exported), "--fleet-key-file", str(wrong), "--out", str(tmp_path / "w")]
    )
    assert refused.exit_code != 0 and "opens with this fleet key" in refused.output and not (tmp_path / "w").exists()


async def test_an_agent_without_the_fleet_key_is_told_how_to_join(broker: Broker, tmp_path: Path) -> None:
    job = replace(small_job("keyless", 1), min_agents=1, join_timeout_s=20, private_adapters=True)
    data = shards(tmp_path, n=1)
    settings = BrokerSettings(url=broker.url)
    coordinator = asyncio.create_task(Coordinator(job, settings, tmp_path / "out").run())
    try:
        agent = Agent(
            AgentSettings("a1", job.job, job.model, data["a1"], runtime_mb=SHARED_PROCESS_RUNTIME_MB), settings
        )
        with pytest.raises(ConfigError, match="--fleet-key-file"):
            await asyncio.wait_for(agent.run(), timeout=120)
    finally:
        coordinator.cancel()
        await asyncio.gather(coordinator, return_exceptions=True)


def test_make_fleet_key_command(tmp_path: Path) -> None:
    result = runner.invoke(agent_app, ["make-fleet-key", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert len(load_fleet_key(tmp_path / "k")) == 32
    again = runner.invoke(agent_app, ["make-fleet-key", "--out", str(tmp_path / "k")])
    assert again.exit_code != 0 and "never overwritten" in again.output
