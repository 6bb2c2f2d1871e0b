"""Fleet security over a real Mosquitto: TLS, a password per member, the broker ACL, and message HMACs.

One Mosquitto for the module, started with the secrets of scripts/fleet_secrets.py (a throwaway CA,
the broker certificate, the password file, the ACL rendered from tools/mosquitto/acl.conf, the job key);
every test uses a job name of its own, so that retained messages do not cross tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import secrets as random_source
import signal
import socket
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from splitft.agent.runtime import Agent, AgentSettings
from splitft.coordinator.brokers import free_port, mosquitto_binary, start_secure_mosquitto
from splitft.coordinator.runtime import Coordinator
from splitft.shared.errors import LinkError, SecretsError
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import write_shards
from splitft.shared.job.records import load_records
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.envelope import Envelope, encode_envelope
from splitft.shared.wire.keys import load_key
from splitft.shared.wire.link import Link
from splitft.shared.wire.topics import Kind, Topics
from splitft.tools.fleet_secrets import (
    FleetSecrets,
    load_fleet_secrets,
    main,
    make_fleet_secrets,
    render_acl,
)

from conftest import Broker, stop_broker

DEVICES = ("a1", "a2")
NOT_AUTHORIZED = 0x87  # MQTT v5 reason code of a PUBACK for a publish the ACL refuses


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetSecrets:
    return make_fleet_secrets(tmp_path_factory.mktemp("fleet") / "secrets", DEVICES)


@pytest.fixture(scope="module")
def secure_broker(fleet: FleetSecrets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = start_secure_mosquitto(tmp_path_factory.mktemp("secure-broker"), fleet)
    yield broker
    stop_broker(broker)


def member(broker: Broker, fleet: FleetSecrets, user: str, **kw: Any) -> BrokerSettings:
    """What one member of the fleet connects with: TLS with the fleet's CA, its own user and password."""
    return BrokerSettings(
        url=broker.url, username=user, password=fleet.password(user), ca_file=str(fleet.ca_cert), **kw
    )


def raw_client(broker: Broker, fleet: FleetSecrets, user: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=fleet.password(user),
        identifier=f"raw-{user}-{random_source.token_hex(3)}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_params=aiomqtt.TLSParameters(ca_certs=str(fleet.ca_cert)),
        timeout=10,
    )


def puback_codes(client: aiomqtt.Client) -> list[int]:
    """The reason codes of the client's PUBACKs, in order (aiomqtt completes a publish whatever the code)."""
    codes: list[int] = []
    paho = client._client
    original: Any = paho.on_publish

    def spy(paho_client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        codes.append(int(reason_code.value))
        original(paho_client, userdata, mid, reason_code, properties)

    paho.on_publish = spy
    return codes


async def messages_until(client: aiomqtt.Client, marker: str, timeout: float = 10) -> list[tuple[str, bytes]]:
    """Every message the client receives up to and including one on topic ``marker``."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append((str(message.topic), message.payload))
            if str(message.topic) == marker:
                return got
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- the secrets themselves


def test_fleet_secrets_files(fleet: FleetSecrets, tmp_path: Path) -> None:
    for path in (fleet.ca_key, fleet.broker_key, fleet.password_file, fleet.passwords_json, fleet.job_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(fleet.folder.stat().st_mode) == 0o700
    passwords = json.loads(fleet.passwords_json.read_text())
    assert sorted(passwords) == ["a1", "a2", "coordinator"] and len(set(passwords.values())) == 3
    lines = fleet.password_file.read_text().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["a1", "a2", "coordinator"]
    assert not any(p in fleet.password_file.read_text() for p in passwords.values())  # hashed
    env = fleet.env_file("a1").read_text()
    assert f"SPLITFT_PASSWORD={passwords['a1']}" in env and "SPLITFT_AGENT_ID=a1" in env
    assert stat.S_IMODE(fleet.env_file("a1").stat().st_mode) == 0o600
    assert len(load_key(fleet.job_key)) == 32
    assert load_fleet_secrets(fleet.folder) == fleet
    verify = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(fleet.ca_cert), str(fleet.broker_cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(fleet.broker_cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    acl = fleet.acl_file.read_text()
    assert "user coordinator\ntopic readwrite splitft/v1/#" in acl
    assert "pattern write splitft/v1/+/agents/%u/act" in acl

    # The command line: another coordinator user name, one job, other host names; a full folder is refused.
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--devices", "d1", "--coordinator", "boss", "--job", "j1",
                 "--hosts", "broker.example.org,10.0.0.5"]) == 0  # fmt: skip
    made = load_fleet_secrets(out)
    assert made.users == ("boss", "d1") and made.hosts == ("broker.example.org", "10.0.0.5")
    acl = made.acl_file.read_text()
    assert "user boss\ntopic readwrite splitft/v1/j1/#" in acl and "pattern read splitft/v1/j1/round" in acl
    assert "+" not in "".join(line for line in acl.splitlines() if not line.startswith("#"))
    assert main(["--out", str(out), "--devices", "d1"]) == 2
    assert render_acl("boss", "j1") == acl
    with pytest.raises(SecretsError, match="coordinator"):
        make_fleet_secrets(tmp_path / "x", ["coordinator"])
    with pytest.raises(SecretsError, match="A-Z"):
        make_fleet_secrets(tmp_path / "x", ["a/b"])
    with pytest.raises(SecretsError, match="job name"):
        make_fleet_secrets(tmp_path / "x", ["a1"], job="j/#")
    assert not (tmp_path / "x").exists()


def test_missing_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from splitft.tools import fleet_secrets

    monkeypatch.setattr(fleet_secrets.shutil, "which", lambda *a, **k: None)
    with pytest.raises(SecretsError, match="'openssl' command is not installed"):
        make_fleet_secrets(tmp_path / "x", ["a1"])
    monkeypatch.setattr(fleet_secrets.shutil, "which", lambda name, **k: None if name == "mosquitto_passwd" else name)
    with pytest.raises(SecretsError, match="'mosquitto_passwd' command is not installed"):
        make_fleet_secrets(tmp_path / "x", ["a1"])
    assert not (tmp_path / "x").exists()  # nothing half-made


async def test_example_mosquitto_config_runs(fleet: FleetSecrets, tmp_path: Path) -> None:
    """tools/mosquitto/splitft-tls.conf, installed as OPERATIONS.md says (a conf.d drop-in under Debian's main
    mosquitto.conf) and pointed at the fleet's files and at free ports, starts and takes a member."""
    example = (Path(__file__).resolve().parent.parent / "tools" / "mosquitto" / "splitft-tls.conf").read_text()
    tls_port, plain_port = free_port(), free_port()
    conf = (
        example.replace("/etc/mosquitto/splitft/", f"{fleet.folder}/")
        .replace("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n")
        .replace("\nlistener 1883 127.0.0.1\n", f"\nlistener {plain_port} 127.0.0.1\n")
    )
    settings = "\n".join(line for line in conf.splitlines() if not line.startswith("#"))
    assert settings.count("127.0.0.1") == 2 and "/etc/" not in settings and "/var/" not in settings
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "splitft.conf").write_text(conf)
    # Debian's /etc/mosquitto/mosquitto.conf, in this test's folder (and as this user, not "mosquitto").
    (tmp_path / "mosquitto.conf").write_text(
        f"user {getpass.getuser()}\npid_file {tmp_path}/mosquitto.pid\npersistence true\n"
        f"persistence_location {tmp_path}/\nlog_dest file {tmp_path}/mosquitto.log\ninclude_dir {tmp_path}/conf.d\n"
    )
    process = subprocess.Popen([mosquitto_binary(), "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.PIPE)
    broker = Broker("127.0.0.1", tls_port, process, tmp_path / "mosquitto.log", scheme="mqtts")
    try:
        topics = Topics("example")
        async with asyncio.timeout(10):
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", tls_port), timeout=0.2):
                    break
                await asyncio.sleep(0.05)
        async with Link(member(broker, fleet, "a1", connect_timeout_s=5), topics, "a1", []) as agent:
            await agent.publish(topics.agent("a1", "join"), Kind.JOIN, {"hello": 1})
        assert "u'a1'" in broker.log.read_text()
    finally:
        stop_broker(broker)


# --------------------------------------------------------------------------- TLS and passwords


async def test_tls_links_exchange_messages(secure_broker: Broker, fleet: FleetSecrets) -> None:
    topics = Topics("tls")
    assert secure_broker.url.startswith("mqtts://127.0.0.1:")
    async with (
        Link(member(secure_broker, fleet, "coordinator"), topics, "coordinator", [topics.all_agents("join")]) as coord,
        Link(member(secure_broker, fleet, "a1"), topics, "a1", [topics.agent("a1", "grad")]) as agent,
    ):
        await agent.publish(topics.agent("a1", "join"), Kind.JOIN, {"hello": "over tls"})
        got = await coord.receive(timeout=10)
        assert got.topic.agent == "a1" and got.envelope.body == {"hello": "over tls"}
        await coord.publish(topics.agent("a1", "grad"), Kind.GRAD, {"g": 1}, round_=1, step=0)
        back = await agent.receive(timeout=10)
        assert back.topic.kind == "grad" and back.envelope.body == {"g": 1}
        assert not coord.rejected and not agent.rejected


@pytest.mark.parametrize(
    ("case", "broker_says"),
    [("wrong_password", "Not authorized"), ("no_ca", "certificate verify failed")],
)
async def test_refused_connections_fail_with_a_link_error(
    secure_broker: Broker, fleet: FleetSecrets, caplog: pytest.LogCaptureFixture, case: str, broker_says: str
) -> None:
    fast = {"connect_timeout_s": 1.5, "backoff_min_s": 0.1, "backoff_max_s": 0.5}
    if case == "wrong_password":
        settings = replace(member(secure_broker, fleet, "a1", **fast), password="not-the-password")
    else:  # TLS with the system's CAs only: the throwaway CA's broker certificate does not verify
        settings = BrokerSettings(
            url=secure_broker.url,
            username="a1",
            password=fleet.password("a1"),
            **fast,  # type: ignore[arg-type]
        )
    topics = Topics("refused")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="splitft.shared.wire.link"), pytest.raises(LinkError) as info:
        async with Link(settings, topics, "a1", []):
            pass
    assert time.monotonic() - started < 10
    assert secure_broker.url in str(info.value)
    # Why the broker refused is in the log lines of every attempt (and, once the link keeps its last
    # connection error, in the LinkError itself).
    assert broker_says in caplog.text + str(info.value)


async def test_revoking_a_device_disconnects_it(tmp_path: Path) -> None:
    """Delete a device's user from the password file and reload Mosquitto (SIGHUP): the device is cut off."""
    fleet = make_fleet_secrets(tmp_path / "secrets", DEVICES)
    broker = start_secure_mosquitto(tmp_path / "broker", fleet)
    try:
        async with raw_client(broker, fleet, "a1") as a1, raw_client(broker, fleet, "a2") as a2:
            subprocess.run(["mosquitto_passwd", "-D", str(fleet.password_file), "a1"], check=True)
            broker.process.send_signal(signal.SIGHUP)
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(10):
                    async for _ in a1.messages:
                        pass
            await a2.publish(Topics("revoke").agent("a2", "act"), b"still here", qos=1, timeout=5)
        with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
            async with raw_client(broker, fleet, "a1"):
                pass
    finally:
        stop_broker(broker)


# --------------------------------------------------------------------------- the broker ACL


async def test_acl_confines_devices_to_their_own_topics(secure_broker: Broker, fleet: FleetSecrets) -> None:
    topics = Topics("acl")
    job_wide = f"{topics.prefix}/#"
    async with (
        raw_client(secure_broker, fleet, "coordinator") as spy,  # may read everything
        raw_client(secure_broker, fleet, "a2") as a2,
        raw_client(secure_broker, fleet, "a1") as a1,
        Link(member(secure_broker, fleet, "coordinator"), topics, "coordinator", [topics.all_agents("act")]) as coord,
        Link(member(secure_broker, fleet, "a1"), topics, "a1", [topics.agent("a1", "grad")]) as agent,
    ):
        await spy.subscribe(job_wide, qos=1)
        await a2.subscribe(job_wide, qos=1)  # a2 may read only its own downlink and the job-wide topics
        await a1.subscribe(job_wide, qos=1)  # so may a1: it could read its own grad/assign, if a1 could write them
        codes = puback_codes(a1)

        # Allowed: a1's activations on its own act topic reach the coordinator.
        await agent.publish(topics.agent("a1", "act"), Kind.ACT, {"x": 1}, round_=1, step=0)
        got = await coord.receive(timeout=10)
        assert got.topic.agent == "a1" and got.envelope.body == {"x": 1}

        # Refused: another device's upload, the coordinator's downlink to a1, job-wide control.
        forbidden = [
            topics.agent("a2", "act"),
            topics.agent("a2", "status"),
            topics.agent("a1", "grad"),
            topics.agent("a1", "assign"),
            topics.agent("a1", "notice"),
            topics.job_topic("round"),
            topics.coordinator_status(),
        ]
        for topic in forbidden:
            await a1.publish(topic, b"forged by a1", qos=1)
        assert codes == [NOT_AUTHORIZED] * len(forbidden)

        # Allowed: the coordinator's gradient reaches a1, and only a1 (a2's wildcard does not see it).
        await coord.publish(topics.agent("a2", "grad"), Kind.GRAD, {"for": "a2"}, round_=1, step=0)
        await coord.publish(topics.agent("a1", "grad"), Kind.GRAD, {"for": "a1"}, round_=1, step=0)
        back = await agent.receive(timeout=10)
        assert back.envelope.body == {"for": "a1"}

        # Messages from one broker arrive in order: once the last allowed one is in, nothing refused can follow.
        marker = topics.agent("a1", "grad")
        seen_by_spy = await messages_until(spy, marker)
        assert [t for t, _ in seen_by_spy] == [topics.agent("a1", "act"), topics.agent("a2", "grad"), marker]
        seen_by_a1 = await messages_until(a1, marker)
        assert [t for t, _ in seen_by_a1] == [marker]  # not a2's gradient, not its own forgeries
        seen_by_a2 = await messages_until(a2, topics.agent("a2", "grad"))
        assert [t for t, _ in seen_by_a2] == [topics.agent("a2", "grad")]  # not a1's act nor a1's forgeries
        assert not coord.rejected and not agent.rejected


async def drop_connection(client: aiomqtt.Client) -> None:
    """End the client's connection the way a crash or a lost network does: no DISCONNECT, so the Will goes out."""
    sock: Any = client._client.socket()
    sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aexit__(None, None, None)


async def test_last_will_only_on_the_devices_own_status(secure_broker: Broker, fleet: FleetSecrets) -> None:
    """Mosquitto accepts a CONNECT with any Will topic but publishes a Will only where the ACL lets the
    client write: an agent's Last Will on its own status topic reaches the coordinator, one on another's never."""
    topics = Topics("will")
    async with raw_client(secure_broker, fleet, "coordinator") as spy:
        await spy.subscribe(f"{topics.prefix}/#", qos=1)
        for owner in ("a2", "a1"):
            topic = topics.agent(owner, "status")
            client = aiomqtt.Client(
                secure_broker.host,
                secure_broker.port,
                username="a1",
                password=fleet.password("a1"),
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_params=aiomqtt.TLSParameters(ca_certs=str(fleet.ca_cert)),
                will=aiomqtt.Will(topic, b"a1 is gone", qos=1, retain=False),
            )
            await client.__aenter__()
            await drop_connection(client)
        seen = await messages_until(spy, topics.agent("a1", "status"))
        assert seen == [(topics.agent("a1", "status"), b"a1 is gone")]


# --------------------------------------------------------------------------- message authentication


def forged(topics: Topics, type_: str, seq: int, *, ts: float | None = None, body: dict | None = None) -> Envelope:
    return Envelope(type=type_, job=topics.job, sender="a1", sid="forger", seq=seq, round=1, step=0,
                    body=body if body is not None else {"seq": seq}, ts=time.time() if ts is None else ts)  # fmt: skip


async def test_hmac_refuses_unsigned_misdirected_and_stale_messages(secure_broker: Broker, fleet: FleetSecrets) -> None:
    """Even a client the broker lets write (here with the coordinator's own broker password) cannot
    get a message past a member's Link without the job key."""
    topics = Topics("hmac")
    key = load_key(fleet.job_key)
    other_key = bytes(range(32))
    subs = [topics.all_agents("act"), topics.all_agents("status")]
    async with (
        Link(member(secure_broker, fleet, "coordinator", auth_key=key), topics, "coordinator", subs) as coord,
        Link(member(secure_broker, fleet, "a1", auth_key=key), topics, "a1", [topics.agent("a1", "grad")]) as agent,
        raw_client(secure_broker, fleet, "coordinator") as raw,
    ):
        # Two members with the job key talk both ways.
        await agent.publish(topics.agent("a1", "act"), Kind.ACT, {"signed": True}, round_=1, step=0)
        got = await coord.receive(timeout=10)
        assert got.envelope.body == {"signed": True}
        await coord.publish(topics.agent("a1", "grad"), Kind.GRAD, {"signed": True}, round_=1, step=0)
        assert (await agent.receive(timeout=10)).envelope.body == {"signed": True}

        a1_act, a2_act, a1_status = topics.agent("a1", "act"), topics.agent("a2", "act"), topics.agent("a1", "status")
        good = encode_envelope(forged(topics, Kind.ACT, 10, body={"good": 1}), key=key, topic=a1_act)
        attempts = [
            (a1_act, encode_envelope(forged(topics, Kind.ACT, 1))),  # unsigned
            (a1_act, encode_envelope(forged(topics, Kind.ACT, 2), key=other_key, topic=a1_act)),  # another key
            (a2_act, good),  # a1's signed activations copied onto a2's topic
            (a1_act, encode_envelope(forged(topics, Kind.ACT, 3, ts=time.time() - 3600), key=key, topic=a1_act)),  # old
            (a1_status, encode_envelope(forged(topics, Kind.STATUS, 4, body={"state": "online"}))),  # unsigned status
        ]
        for topic, payload in attempts:
            await raw.publish(topic, payload, qos=1)
        # Status messages may be old (retained, Last Wills) but must be signed; the copied bytes pass on
        # the topic they were signed for.
        old_status = forged(topics, Kind.STATUS, 5, ts=time.time() - 3600, body={"state": "offline"})
        await raw.publish(a1_status, encode_envelope(old_status, key=key, topic=a1_status), qos=1)
        await raw.publish(a1_act, good, qos=1)

        status = await coord.receive(timeout=10)
        assert status.topic.kind == "status" and status.envelope.body == {"state": "offline"}
        last = await coord.receive(timeout=10)
        assert last.topic.agent == "a1" and last.envelope.body == {"good": 1}
        assert coord.rejected == Counter({"unauthenticated": 2, "bad_auth": 2, "stale": 1})
        assert coord.pending() == 0 and not agent.rejected


# --------------------------------------------------------------------------- a whole job, everything on


@pytest.mark.parametrize("split", ["two-part", "u"])
async def test_job_over_tls_with_passwords_acl_and_hmac(
    secure_broker: Broker, fleet: FleetSecrets, tmp_path: Path, split: str
) -> None:
    """A whole job through TLS, the ACL and HMACs; in the U split too (its tail topics must be in the ACL)."""
    job = JobConfig(
        split=split,
        job="secure",
        model="tiny-gpt2",
        rounds=1,
        local_steps=1,
        batch_size=2,
        max_length=64,
        min_agents=2,
        cuts={"a1": 1, "a2": 2},
        eval_samples=4,
        step_timeout_s=60,
        upload_timeout_s=60,
        join_window_s=0.2,
    )
    key = load_key(fleet.job_key)
    shards = write_shards(load_records(GSM8K / "train.jsonl", limit=16), 2, tmp_path / "shards", seed=0)
    out = tmp_path / "out"
    coordinator = Coordinator(job, member(secure_broker, fleet, "coordinator", auth_key=key), out)
    agents = [
        Agent(AgentSettings(name, job.job, job.model, path), member(secure_broker, fleet, name, auth_key=key))
        for name, path in zip(DEVICES, shards, strict=True)
    ]
    tasks = [asyncio.create_task(a.run(), name=a.name) for a in agents]
    try:
        await asyncio.wait_for(coordinator.run(), timeout=120)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [a.rounds_done for a in agents] == [1, 1]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    last = metrics[-1]
    assert sorted(last["agents"]) == ["a1", "a2"]
    assert all(a["dropped"] is None for a in last["agents"].values())
    assert not {"unauthenticated", "bad_auth", "stale"} & set(last["rejected"]), last["rejected"]
    # The members really logged in as themselves (Mosquitto logs the user name of every connection).
    log = secure_broker.log.read_text()
    assert all(f"u'{user}'" in log for user in fleet.users)
