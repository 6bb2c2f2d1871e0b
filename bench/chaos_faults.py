"""The chaos soak's hands on a job (splitft.bench.chaos): a raw MQTT client that watches the job's control
topics and publishes for the driver (:class:`Wire`), garbage (:func:`garbage`), forged uploads
(:func:`forged_upload`), what the members counted against what they were sent (:func:`logged_refusals`,
:func:`accounting`, :func:`forgery_outcomes`), the report, and the processes' peak memory (:class:`RssPoller`).

Every envelope the driver makes carries a session id that starts with ``chaos`` (the members' are hex), and the
watcher subscribes with MQTT v5's no-local option, so it never reads its own messages as the members'.

Each piece of garbage names the refusal reason every receiver listening must count for it where that reason does
not depend on the receiver's state (the reasons genuine traffic never produces: a receiver counts at least as many
as it was sent while it listened), or None where it does (a truncated frame on a topic that expects nothing now
is ``unexpected`` before it is ``bad_compression``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import psutil
import torch
import zstandard
from paho.mqtt.subscribeoptions import SubscribeOptions
from safetensors.torch import load_file

from splitft.shared.errors import Refusal
from splitft.shared.wire.codec import decode_state
from splitft.shared.wire.envelope import Envelope, decode_envelope, encode_envelope
from splitft.shared.wire.messages import adapter_body
from splitft.shared.wire.topics import COORDINATOR, Topics

MARK = "chaos"  # the session ids of the driver's envelopes, and the marker lines it writes into the members' logs
MB = 1 << 20
_quiet = logging.Logger(f"{__name__}.mqtt", logging.CRITICAL)  # the wire's lost connections are the faults themselves
#: reasons only garbage produces: a listening receiver counts at least as many as it was sent
PREDICTABLE = frozenset({"empty", "bad_topic", "bad_compression", "too_large", "bad_version", "wrong_type",
                         "wrong_job", "wrong_sender", "bad_schema", "unauthenticated", "bad_auth"})  # fmt: skip


@dataclass(frozen=True)
class Sent:
    """A message the driver published (the broker took it at ``t``, time.monotonic())."""

    t: float
    label: str
    topic: str
    receivers: tuple[str, ...]  # the members that read its topic
    reason: str | None  # the refusal each of them must count (None: it depends on the receiver's state)


@dataclass
class Seen:
    """What the wire shows of one member: its session, whether it listens, and every change of that."""

    sid: str | None = None
    joined: str | None = None  # an agent's session that joined last
    listening: bool = False
    changes: list[tuple[float, bool, str]] = field(default_factory=list)  # (t, listening, session)

    def set(self, t: float, listening: bool, sid: str) -> None:
        if listening != self.listening or sid != self.sid:
            self.changes.append((t, listening, sid))
        self.listening, self.sid = listening, sid

    def during(self, a: float, b: float) -> str | None:
        """Its session if it listened from ``a`` to ``b`` without a change, else None."""
        state: tuple[bool, str] | None = None
        for t, listening, sid in self.changes:
            if t <= a:
                state = (listening, sid)
            elif t <= b:
                return None
        return state[1] if state is not None and state[0] else None


class Wire:
    """A raw MQTT client on one job's control topics (statuses, joins, assignments, notices, uploads, rounds,
    metrics), reconnecting after a broker restart; it also publishes the driver's messages."""

    def __init__(self, host: str, port: int, job: str, agents: tuple[str, ...]) -> None:
        self.host, self.port, self.job = host, port, job
        self.topics = Topics(job)
        self.members = {COORDINATOR: Seen(), **{a: Seen() for a in agents}}
        self.round = 0  # the last round start seen
        self.metrics: list[tuple[float, str, dict[str, Any]]] = []  # (t, coordinator session, record)
        self.uploads: list[tuple[float, str, str | None]] = []  # the agents' own: (t, agent, corr)
        self.notices: list[tuple[float, str, str | None, dict[str, Any]]] = []  # (t, agent, corr, body)
        self.done = False
        self.connects = 0
        self.sent: list[Sent] = []
        self.on_assign: Callable[[str, Envelope], None] | None = None
        self._client: aiomqtt.Client | None = None

    async def run(self) -> None:
        t = self.topics
        filters = [t.coordinator_status(), t.job_topic("round"), t.job_topic("metrics")]
        filters += [t.all_agents(k) for k in ("status", "join", "assign", "notice", "adapter")]
        options = SubscribeOptions(qos=1, noLocal=True)  # never its own garbage back
        while True:
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=f"{MARK}-wire-{self.job}-{os.getpid()}",
                    protocol=aiomqtt.ProtocolVersion.V5, timeout=10, logger=_quiet,
                ) as client:  # fmt: skip
                    for f in filters:
                        await client.subscribe(f, options=options)
                    self._client = client
                    self.connects += 1
                    async for message in client.messages:
                        if isinstance(message.payload, bytes):
                            self._see(str(message.topic), message.payload)
            except aiomqtt.MqttError:
                pass
            finally:
                self._client = None
            now = time.monotonic()  # blind while disconnected: nobody counts as listening
            for seen in self.members.values():
                seen.set(now, False, seen.sid or "")
            await asyncio.sleep(0.3)

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def publish(
        self, label: str, topic: str, payload: bytes, receivers: tuple[str, ...], reason: str | None
    ) -> bool:
        """Publish (QoS 1) and remember it once the broker took it; False while the broker is away."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, timeout=10)
        except aiomqtt.MqttError:
            return False
        self.sent.append(Sent(time.monotonic(), label, topic, receivers, reason))
        return True

    def completed_since(self, t: float) -> int:
        """The latest round a metrics line published after ``t`` reports (0: none)."""
        return max((int(m.get("round", 0)) for at, _, m in self.metrics if at >= t), default=0)

    def _see(self, topic_name: str, payload: bytes) -> None:
        now, topic = time.monotonic(), self.topics.parse(topic_name)
        if topic is None or not payload or len(payload) > 16 * MB:
            return
        try:
            env = decode_envelope(payload)
        except Exception:  # garbage of someone else's: not the members'
            return
        if env.sid.startswith(MARK) or env.job != self.job:
            return
        kind, agent, body = topic.kind, topic.agent, env.body
        if kind == "coordinator_status" and env.sender == COORDINATOR:
            self.members[COORDINATOR].set(now, body.get("state") == "online", env.sid)
            self.done = self.done or body.get("done") is True
        elif kind == "round" and env.sender == COORDINATOR:
            if body.get("event") == "start":
                self.round = env.round
            self.done = self.done or body.get("event") == "done"
        elif kind == "metrics" and env.sender == COORDINATOR:
            self.metrics.append((now, env.sid, body))
        elif agent in self.members and agent != COORDINATOR:
            seen = self.members[agent]
            if kind == "status" and env.sender == agent:
                online = body.get("state") == "online"
                seen.set(now, online and env.sid == seen.joined, env.sid)  # a new process listens once it joined
            elif kind == "join" and env.sender == agent:
                seen.joined = env.sid
                seen.set(now, True, env.sid)
            elif kind == "assign" and env.sender == COORDINATOR and self.on_assign is not None:
                self.on_assign(agent, env)
            elif kind == "notice" and env.sender == COORDINATOR:
                self.notices.append((now, agent, env.corr, body))
            elif kind == "adapter" and env.sender == agent:
                self.uploads.append((now, agent, env.corr))


# --------------------------------------------------------------------------- garbage


@functools.cache
def bomb(mib: int) -> bytes:
    """A zstd frame of zeros that declares ``mib`` MiB: a few kilobytes on the wire."""
    writer = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=mib * MB)
    zeros = bytes(MB)
    return b"".join([writer.compress(zeros) for _ in range(mib)] + [writer.flush()])


def _envelope(job: str, type_: str, sender: str, rng: random.Random, body: dict[str, Any] | None = None) -> Envelope:
    return Envelope(
        type=type_, job=job, sender=sender, sid=f"{MARK}{rng.getrandbits(48):012x}", seq=rng.randrange(1 << 30),
        body=body if body is not None else {"state": "online", "role": "agent"}, round=1, step=0, ts=time.time(),
    )  # fmt: skip


def _other_version(frame: bytes) -> bytes:
    """An envelope as a member of another protocol version would send it."""
    fields = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(frame), raw=False)
    fields["v"] = int(fields["v"]) + 7
    return zstandard.ZstdCompressor(write_content_size=True).compress(msgpack.packb(fields, use_bin_type=True))


def garbage(
    job: str, agents: tuple[str, ...], rng: random.Random, keyed: bool
) -> list[tuple[str, str, bytes, tuple[str, ...], str | None]]:
    """One burst: (label, topic, payload, receivers, reason) for the coordinator's topics and the agents'.

    With a job key every envelope is unsigned or signed with a wrong key (refused before anything else), and
    so are random bytes, truncated frames and bombs (they are not sealed)."""
    t = Topics(job)
    x = rng.choice(agents)
    y = rng.choice([a for a in agents if a != x])
    wrong_key = rng.randbytes(32)
    everyone, coord = tuple(agents), (COORDINATOR,)
    out: list[tuple[str, str, bytes, tuple[str, ...], str | None]] = []

    def raw(label: str, topic: str, payload: bytes, receivers: tuple[str, ...], reason: str | None) -> None:
        # With a key, the seal is checked right after the topic and the empty payload: nothing here is sealed.
        sealed_first = keyed and payload and reason != "bad_topic"
        out.append((label, topic, payload, receivers, "unauthenticated" if sealed_first else reason))

    def envelope(label: str, topic: str, env: Envelope, receivers: tuple[str, ...], reason: str | None) -> None:
        if keyed and rng.random() < 0.5:
            out.append((label, topic, encode_envelope(env, key=wrong_key, topic=topic), receivers, "bad_auth"))
        else:
            frame = encode_envelope(env)
            raw(label, topic, _other_version(frame) if label == "bad_version" else frame, receivers, reason)

    def truncated(env: Envelope) -> bytes:
        frame = encode_envelope(env)
        return frame[: rng.randrange(1, len(frame) - 5)]  # the checksum and some data cut off

    # The coordinator's topics: agents' statuses and joins (always expected, 64 KiB at most), and the step topics.
    raw("random", t.agent(x, "act"), rng.randbytes(rng.randrange(1, 300)), coord, "bad_compression")
    raw("truncated", t.agent(x, "status"), truncated(_envelope(job, "status", x, rng)), coord, "bad_compression")
    raw("bomb", t.agent(x, "adapter"), bomb(300), coord, "too_large")  # over every member's limit
    raw("bomb", t.agent(x, "join"), bomb(200), coord, "too_large")  # within the limit, over the topic's bound
    raw("bomb_header", t.agent(x, "tail_grad"), b"\x28\xb5\x2f\xfd" + b"\xff" * 9, coord, None)
    envelope("wrong_type", t.agent(x, "join"), _envelope(job, "status", x, rng), coord, "wrong_type")
    envelope("wrong_job", t.agent(x, "status"), _envelope(f"not-{job}", "status", x, rng), coord, "wrong_job")
    envelope("wrong_sender", t.agent(x, "join"), _envelope(job, "join", y, rng), coord, "wrong_sender")
    envelope("bad_version", t.agent(x, "status"), _envelope(job, "status", x, rng), coord, "bad_version")
    raw("empty", t.agent(x, "join"), b"", coord, "empty")
    raw("bad_topic", f"{t.prefix}/agents/{'x' * 70}/join", encode_envelope(_envelope(job, "join", x, rng)), coord,
        "bad_topic")  # fmt: skip
    bad_status = _envelope(job, "status", x, rng, {"state": "sideways"})
    envelope("bad_body", t.agent(x, "status"), bad_status, coord, "bad_schema")
    envelope("bad_body", t.agent(x, "join"), _envelope(job, "join", x, rng, {"model": 3}), coord, "bad_schema")
    # The agents' topics: notices and round events (64 KiB at most), assignments, gradients, the coordinator's status.
    notice = {"event": "dropped", "reason": "chaos"}
    raw("random", t.agent(x, "assign"), rng.randbytes(rng.randrange(1, 300)), (x,), "bad_compression")
    raw("truncated", t.agent(x, "notice"), truncated(_envelope(job, "notice", COORDINATOR, rng, notice)), (x,),
        "bad_compression")  # fmt: skip
    raw("bomb", t.agent(x, "grad"), bomb(300), (x,), "too_large")
    raw("bomb", t.agent(x, "notice"), bomb(200), (x,), "too_large")
    envelope("wrong_type", t.agent(x, "notice"), _envelope(job, "assign", COORDINATOR, rng, notice), (x,),
             "wrong_type")  # fmt: skip
    envelope("wrong_job", t.agent(x, "notice"), _envelope(f"not-{job}", "notice", COORDINATOR, rng, notice), (x,),
             "wrong_job")  # fmt: skip
    envelope("wrong_sender", t.agent(x, "notice"), _envelope(job, "notice", x, rng, notice), (x,), "wrong_sender")
    envelope("bad_version", t.agent(x, "notice"), _envelope(job, "notice", COORDINATOR, rng, notice), (x,),
             "bad_version")  # fmt: skip
    raw("empty", t.agent(x, "notice"), b"", (x,), "empty")
    raw("random", t.job_topic("round"), rng.randbytes(rng.randrange(1, 300)), everyone, "bad_compression")
    envelope("wrong_type", t.coordinator_status(), _envelope(job, "round", COORDINATOR, rng, {"event": "start"}),
             everyone, "wrong_type")  # fmt: skip
    bad_assign = _envelope(job, "assign", COORDINATOR, rng, {"model": "tiny-gpt2", "cut": "two"})
    envelope("bad_body", t.agent(x, "assign"), bad_assign, (x,), "bad_schema")
    # Well-formed messages of a bad body that are not an assignment: a round event, a notice (in a step or not).
    envelope("probe_round", t.job_topic("round"), _envelope(job, "round", COORDINATOR, rng, {"event": 7}), everyone,
             "bad_schema")  # fmt: skip
    probe = _envelope(job, "notice", COORDINATOR, rng, {"event": "explode", "reason": 3})
    envelope("probe_notice", t.agent(x, "notice"), probe, (x,), "bad_schema")
    return out


def forged_upload(job: str, agent: str, assign: Envelope, kind: str, rng: random.Random, key: bytes | None) -> bytes:
    """An adapter upload on ``agent``'s topic answering its live assignment (``corr`` read off the wire): its
    adapters x 1e6 (``outlier``, and what ``wrong_key`` and ``unsigned`` carry) or with a NaN (``nan``);
    signed with ``key`` when given."""
    state = decode_state(assign.body["adapter"])
    if kind == "nan":
        first = next(iter(state))
        state[first] = torch.full_like(state[first], float("nan"))
    else:
        state = {n: v * 1e6 for n, v in state.items()}
    body = adapter_body(state, tokens=512, samples=8, loss=1.0, timings={})
    env = Envelope(
        type="adapter", job=job, sender=agent, sid=f"{MARK}{rng.getrandbits(48):012x}", seq=1, body=body,
        round=assign.round, step=-1, corr=assign.corr, ts=time.time(),
    )  # fmt: skip
    topic = Topics(job).agent(agent, "adapter")
    return encode_envelope(env) if key is None else encode_envelope(env, key=key, topic=topic)


# --------------------------------------------------------------------------- what the members counted

_REFUSED = re.compile(r"(?:rejected a message (?:on (\S+)|from \S+)|refused an? (\w+) message): (\w+) \(")
_REASONS = frozenset(str(r) for r in Refusal)


def logged_refusals(log: Path) -> tuple[list[Counter[str]], Counter[str]]:
    """The refusals a member's log names: by reason for each of its processes (the driver writes a ``chaos:``
    line before starting each), and by ``kind/reason`` over all of them (kind: the topic's last segment)."""
    processes: list[Counter[str]] = []
    by_kind: Counter[str] = Counter()
    if not log.is_file():
        return processes, by_kind
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(f"{MARK}:"):
            processes.append(Counter())
            continue
        match = _REFUSED.search(line)
        if match is None or match[3] not in _REASONS:
            continue
        if not processes:
            processes.append(Counter())
        processes[-1][match[3]] += 1
        kind = (match[1] or "").rsplit("/", 1)[-1] or match[2] or "?"
        by_kind[f"{kind}/{match[3]}"] += 1
    return processes, by_kind


def accounting(
    wire: Wire,
    faults: list[tuple[str, float, float]],
    counted: dict[str, Counter[str]],
    by_kind: dict[str, Counter[str]],
    agents: tuple[str, ...],
) -> dict[str, Any]:
    """What each member had to refuse, of what the driver sent while it listened (online from 0.5 s before to
    1.5 s after, and no process fault on it in flight: ``faults`` are (role or "broker", start, end)), against
    what its log counted: ``uncounted`` by the reasons only garbage produces, ``short`` in all (every message
    but a forged NaN or outlier upload must be refused). ``by_kind``: the agents' counts by ``kind/reason``
    (the probes, a bad round event and a bad notice, are reported apart too)."""

    def eligible(x: Sent, role: str) -> bool:
        hit = any(r in (role, "broker") and a - 1.0 <= x.t <= b + 0.5 for r, a, b in faults)
        return not hit and wire.members[role].during(x.t - 0.5, x.t + 1.5) is not None

    out: dict[str, Any] = {}
    for role in (COORDINATOR, *agents):
        sent = [x for x in wire.sent if role in x.receivers]
        heard = [x for x in sent if eligible(x, role)]
        expected = Counter(x.reason for x in heard if x.reason in PREDICTABLE)
        must = sum(1 for x in heard if not x.label.startswith(("forged_outlier", "forged_nan")))
        have = counted[role]
        out[role] = {
            "sent": len(sent), "while_listening": len(heard), "expected": dict(expected), "counted": dict(have),
            "uncounted": {r: n - have[r] for r, n in expected.items() if have[r] < n},
            "short": max(must - sum(have.values()), 0),
        }  # fmt: skip
        if role != COORDINATOR:  # probes heard, and how many its log counted (a round event, a notice: bad_schema)
            logged = by_kind[role]
            out[role]["probes"] = {
                f"{label}: heard": sum(x.label == label and x.reason == "bad_schema" for x in heard)
                for label in ("probe_round", "probe_notice")
            } | {
                "probe_round: counted": logged["round/bad_schema"],
                "probe_notice: counted": logged["notice/bad_schema"],
            }
    return out


def forgery_outcomes(wire: Wire, forgeries: list[dict[str, Any]], counted: Counter[str]) -> dict[str, Any]:
    """What became of each forged upload, from the wire: the agent's real upload for the same assignment came
    before or after it, and whether the coordinator refused the agent's upload (a ``refused`` notice: a veto)."""
    outcomes: Counter[str] = Counter()
    for f in forgeries:
        real = [t for t, agent, corr in wire.uploads if agent == f["agent"] and corr == f["corr"]]
        vetoed = any(a == f["agent"] and c == f["corr"] and b.get("event") == "refused" for _, a, c, b in wire.notices)
        if not f.get("sent"):
            what = "not sent (broker away)"
        elif f["kind"] in ("wrong_key", "unsigned"):
            what = "refused at the link (see accounting)"
        elif vetoed:
            what = "vetoed the agent (its upload refused, the round rolled back)"
        elif not real:
            what = "no real upload for that assignment (dropped or retried)"
        elif f["t"] < real[0]:
            what = "came first; the real upload was taken"
        else:
            what = "came after the real upload"
        f["outcome"] = what
        outcomes[f"{f['kind']}: {what}"] += 1
    # A NaN upload that came first is refused as nonfinite on arrival; an outlier that came first is taken, then
    # refused as an outlier where the round's uploads are screened: in an attempt that completed (one cut short
    # by a fault is rolled back unscreened). Without that screening it vetoes the agent (a notice, above).
    completed = {f"{sid}:{m.get('round')}:{m.get('attempt')}" for _, sid, m in wire.metrics}
    first = [f for f in forgeries if f.get("outcome", "").startswith("came first")]
    expected = {"nonfinite": sum(f["kind"] == "nan" for f in first),
                "outlier": sum(f["kind"] == "outlier" and f["corr"] in completed for f in first)}  # fmt: skip
    return {"outcomes": dict(outcomes), "expected": expected, "counted": {r: counted[r] for r in expected},
            "uncounted": {r: n - counted[r] for r, n in expected.items() if counted[r] < n},
            "list": [{k: v for k, v in f.items() if k != "t"} for f in forgeries]}  # fmt: skip


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines (a failed job's last line has no evaluation fields)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def compare_adapters(reference: Path, adapter: Path) -> tuple[bool, str | None]:
    """Tensor by tensor, bit for bit (torch.equal); the first difference, named."""
    if not reference.is_file() or not adapter.is_file():
        return False, f"missing {adapter if reference.is_file() else reference}"
    a, b = load_file(reference), load_file(adapter)
    if a.keys() != b.keys():
        return False, f"tensor names differ: {sorted(a.keys() ^ b.keys())[:4]}"
    unequal = [n for n in sorted(a) if not torch.equal(a[n], b[n])]
    if unequal:
        worst = max(unequal, key=lambda n: float((a[n].double() - b[n].double()).abs().max()))
        delta = float((a[worst].double() - b[worst].double()).abs().max())
        return False, f"{len(unequal)} of {len(a)} tensors differ; most: {worst} (max |diff| {delta:.3g})"
    return True, None


def write_report(summary: dict[str, Any], out: Path) -> None:
    """summary.json, and summary.md: the totals and a row per job."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    def fmt(counts: dict[str, Any], unit: str = "") -> str:
        return ", ".join(
            f"{k} {v:.0f}{unit}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(counts.items())
        )

    yes = {True: "yes", False: "NO"}
    lines = [
        "# Chaos soak", "",
        f"{summary['jobs_run']} jobs run, {summary['jobs_finished']} finished, {summary['adapters_equal']} adapters equal "
        f"to the reference bit for bit; process faults survived {summary['process_faults_survived']}; refusals "
        f"uncounted {summary['uncounted']}; {summary['elapsed_s']:.0f} s{' (interrupted)' * summary['interrupted']}; "
        f"verdict: {'OK' if summary['ok'] else 'FAILED'}.", "",
        f"- faults by kind: {fmt(summary['faults_by_kind'])}",
        f"- refusals, the jobs' last metrics lines: {fmt(summary['refusals_last_lines'])}",
        *(f"- refusals logged by {role}: {fmt(c)}" for role, c in summary["refusals_logged"].items()),
        f"- forged uploads: {fmt(summary['forgery_outcomes'])}",
        f"- agents' probes (bad round events and notices): {fmt(summary['agent_probes'])}",
        f"- peak RSS: {fmt(summary['peak_rss_mb'], ' MiB')} (reference run: {fmt(summary['peak_rss_mb_reference'], ' MiB')})",
        "", "| job | mode | s | finished | adapter equal | faults | refused (last metrics line) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {j['job']} | {'key' if j['keyed'] else 'no key'} | {j['seconds']:.0f} | {yes[j['finished']]} | "
          f"{yes[bool(j.get('adapter_equal'))]} | {fmt({k: v for k, v in j['faults_by_kind'].items() if v})} | "
          f"{fmt(j['rejected_last_line'])} | {fmt(j['peak_rss_mb'])} |" for j in summary["jobs"]), "",
    ]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- memory


class RssPoller:
    """The peak resident memory of every process it is given, by role, polled on a thread of its own."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.peaks: dict[str, dict[str, float]] = {}  # scope (a job) -> role -> MiB
        self._watched: list[tuple[str, str, Any]] = []  # (scope, role, Popen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-rss", daemon=True)

    def watch(self, scope: str, role: str, process: Any) -> None:
        with self._lock:
            self._watched.append((scope, role, process))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                watched = [w for w in self._watched if w[2].poll() is None]  # (not reaped: the pid is still ours)
                self._watched = watched
            for scope, role, process in watched:
                with contextlib.suppress(psutil.Error):
                    mib = psutil.Process(process.pid).memory_info().rss / MB
                    peaks = self.peaks.setdefault(scope, {})
                    peaks[role] = max(peaks.get(role, 0.0), round(mib, 1))
