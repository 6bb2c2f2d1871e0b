"""The chaos soak: federated jobs run back to back for a set time while a seeded driver injects faults, and each
job's adapter is compared bit for bit with an uninterrupted reference run of the same job.

    python scripts/chaos.py                  # 30 minutes, keyed and unkeyed jobs in turn, into runs/chaos/
    python scripts/chaos.py --minutes 3      # the variant tests/test_chaos.py runs

Everything is real and local: a Mosquitto it starts on a free 127.0.0.1 port, and per job the coordinator
(``splitft-coordinator run``) and three agents (``splitft-agent join``, the tiny-gpt2 preset), each its own OS
process with the same torch thread count (``--threads``), min_agents = 3. The reference job runs first, with
no faults; then chaos jobs of the same job file (other names) until the time is up, with the job key (made by
``splitft-coordinator make-key``) and without, in turn. The faults (one process fault in flight at a time: the
next waits until the fleet is back, the round it hit has completed and a quiet round has passed, so that no round
loses more than one of its MAX_ATTEMPTS = 3 to them, and every member listens to the garbage for a while):

* ``agent_kill``: SIGKILL an agent mid-round, start it again; ``coordinator_kill``: SIGKILL the coordinator
  mid-round, start it again with ``--resume``; ``broker_restart``: stop Mosquitto, start it on the same port.
  Never in a job's last round, so that its end stays clean.
* ``garbage``: bursts of random bytes, truncated frames, zstd bombs, envelopes of the wrong type, job, sender
  or protocol version, empty payloads, a topic of no member, bad bodies, on the coordinator's topics and the
  agents' (bench/chaos_faults.py).
* ``forged_*``: once a round, an adapter upload on an agent's topic answering its live assignment (the ``corr``
  read off the wire): without a key its adapters x 1e6 (``outlier``) or with a NaN (``nan``); with a key the
  same signed with a wrong key (``wrong_key``) or not signed (``unsigned``).

Written to ``--out``: ``summary.json`` and ``summary.md`` (jobs, faults by kind, recoveries, refusals by reason
as each job's metrics.jsonl and the members' logs count them against what the driver sent while they listened,
peak RSS of the coordinator and each agent, polled every 0.5 s), ``events.jsonl`` (a line per fault and job) and
a folder per job (job.toml, out/, logs/)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitft.bench import chaos_faults as cf
from splitft.coordinator.brokers import Broker, start_mosquitto, stop_broker
from splitft.shared.job.data import write_shards
from splitft.shared.job.records import load_records
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.envelope import Envelope
from splitft.shared.wire.topics import COORDINATOR

PROCESS_FAULTS = ("agent_kill", "broker_restart", "coordinator_kill")
FORGERIES = {False: ("outlier", "nan"), True: ("wrong_key", "unsigned")}  # by keyed
FAULT_KINDS = (*PROCESS_FAULTS, "garbage", *(f"forged_{k}" for kinds in FORGERIES.values() for k in kinds))
BIN = Path(sys.executable).parent
RECOVERY_S = 240.0  # a fault the fleet is not back from within this is reported as not survived


@dataclass(frozen=True)
class ChaosSettings:
    out: Path = Path("runs/chaos")
    minutes: float = 30.0  # no job starts after this (the reference included); at least one of each mode runs
    seed: int = 0
    modes: tuple[bool, ...] = (False, True)  # keyed or not, in turn
    agents: tuple[str, ...] = ("a1", "a2", "a3")
    rounds: int = 5
    local_steps: int = 3
    split: str = "u"
    threads: int = 1  # torch threads of every process (OMP_NUM_THREADS): results are reproducible only at one count
    fault_rate: float = 0.7  # chance a round start gets a process fault, once every kind was injected
    garbage_period_s: float = 1.5
    job_timeout_s: float = 900.0


def job_toml(name: str, s: ChaosSettings) -> str:
    cuts = "".join(f"{a} = {i % 3 + 1}\n" for i, a in enumerate(s.agents))
    return (
        f'job = "{name}"\nmodel = "tiny-gpt2"\nrounds = {s.rounds}\nlocal_steps = {s.local_steps}\nbatch_size = 2\n'
        f'max_length = 96\nmin_agents = {len(s.agents)}\nsplit = "{s.split}"\neval_samples = 4\nstep_timeout_s = 60\n'
        f"upload_timeout_s = 60\njoin_window_s = 0.2\njoin_timeout_s = 300\nseed = {s.seed}\n[cuts]\n{cuts}"
    )


def _moved_on(wire: cf.Wire, seen: int) -> bool:
    return wire.round > seen or wire.done


def _fault_round(wire: cf.Wire) -> int:
    """The round a fault injected now lands in: the one running, or the next when the last one seen has completed."""
    done = max((int(m.get("round", 0)) for _, _, m in wire.metrics), default=0)
    return wire.round if wire.round > done else done + 1


async def until(predicate: Callable[[], bool], timeout_s: float, period_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(period_s)
    return True


@dataclass
class Fault:
    kind: str
    target: str
    round: int  # the round it hit (in progress, or the next one)
    start: float
    end: float | None = None  # when the fleet was back and that round completed
    recovered: bool = False

    def report(self, t0: float) -> dict[str, Any]:
        back = None if self.end is None else round(self.end - self.start, 1)
        return {"kind": self.kind, "target": self.target, "round": self.round, "at_s": round(self.start - t0, 1),
                "back_in_s": back, "recovered": self.recovered}  # fmt: skip


class Fleet:
    """One job's processes: the coordinator and the agents, started here and ended here by pid."""

    def __init__(self, soak: Soak, name: str, folder: Path, keyed: bool) -> None:
        self.soak, self.name, self.logs = soak, name, folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config, self.out, self.keyed = folder / "job.toml", folder / "out", keyed
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.history: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.killed: set[int] = set()

    def command(self, role: str, resume: bool) -> list[str]:
        url, key = self.soak.broker.url, ["--auth-key-file", str(self.soak.key)] if self.keyed else []
        if role == COORDINATOR:
            return [str(BIN / "splitft-coordinator"), "-v", "run", "--broker", url, "--config", str(self.config),
                    "--out", str(self.out), *key, *(["--resume"] if resume else [])]  # fmt: skip
        data = self.soak.shards[role]
        return [str(BIN / "splitft-agent"), "-v", "join", "--broker", url, "--job", self.name, "--data", str(data),
                "--model", "tiny-gpt2", "--id", role, *key]  # fmt: skip

    def start(self, role: str, resume: bool = False) -> None:
        with (self.logs / f"{role}.log").open("ab") as log:
            log.write(f"{cf.MARK}: starting {role}{' --resume' if resume else ''}\n".encode())
            log.flush()
            process = subprocess.Popen(
                self.command(role, resume), stdout=log, stderr=subprocess.STDOUT, env=self.soak.env,
                start_new_session=True,  # Ctrl-C reaches the driver only; it ends them
            )  # fmt: skip
        self.procs[role] = process
        self.history.append((role, process))
        self.soak.rss.watch(self.name, role, process)

    def kill(self, role: str) -> int:
        process = self.procs[role]
        self.killed.add(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        return process.pid

    def finished(self) -> int | None:
        """The coordinator's exit code once a process of it that the driver did not kill has ended."""
        process = self.procs[COORDINATOR]
        code = process.poll()
        return None if code is None or process.pid in self.killed else code

    def stop_all(self) -> None:
        for _, process in self.history:
            if process.poll() is None:
                process.kill()
                process.wait()


@dataclass
class JobState:
    name: str
    keyed: bool
    chaos: bool
    wire: cf.Wire
    fleet: Fleet
    rng: random.Random
    forge_kinds: itertools.cycle[str]
    faults: list[Fault] = field(default_factory=list)
    forgeries: list[dict[str, Any]] = field(default_factory=list)
    forged_rounds: set[int] = field(default_factory=set)
    garbage_bursts: int = 0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


class Soak:
    def __init__(self, settings: ChaosSettings) -> None:
        self.s = settings
        self.out = settings.out
        self.rng = random.Random(settings.seed)
        self.rss = cf.RssPoller()
        self.env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads),
                    "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        self.t0 = time.monotonic()
        self.jobs: list[dict[str, Any]] = []
        self.reference: dict[str, Any] = {}
        self.faults: Counter[str] = Counter()
        self._kinds: list[str] = []
        self.broker: Broker
        self.key = self.out / "job.key"
        self.shards: dict[str, Path] = {}

    def say(self, message: str, **event: Any) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {message}", flush=True)
        with (self.out / "events.jsonl").open("a") as f:
            f.write(json.dumps({"t_s": round(time.monotonic() - self.t0, 2), "message": message, **event}) + "\n")

    async def run(self) -> dict[str, Any]:
        if self.out.is_dir() and any(self.out.iterdir()):
            if not (self.out / "events.jsonl").is_file():
                raise FileExistsError(f"{self.out} is not empty and holds no earlier soak: give another --out")
            for old in [*self.out.glob("chaos-*"), self.out / "data", self.out / "broker", self.out / "events.jsonl"]:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)  # an earlier soak's (checkpoints!)
        self.out.mkdir(parents=True, exist_ok=True)
        pairs = load_records(GSM8K / "train.jsonl", limit=16 * len(self.s.agents))
        paths = write_shards(pairs, len(self.s.agents), self.out / "data", seed=self.s.seed)
        self.shards = dict(zip(self.s.agents, paths, strict=True))
        if not self.key.exists():
            subprocess.run([str(BIN / "splitft-coordinator"), "make-key", "--out", str(self.key)], check=True,
                           capture_output=True)  # fmt: skip
        self.broker = start_mosquitto(self.out / "broker")
        self.rss.start()
        interrupted = True
        try:
            self.say(f"broker at {self.broker.url}; reference job (no faults) first")
            self.reference = await self._job("chaos-ref", keyed=False, chaos=False)
            deadline = self.t0 + 60 * self.s.minutes
            for n in itertools.count(1):
                keyed = self.s.modes[(n - 1) % len(self.s.modes)]
                if time.monotonic() >= deadline and n > len(self.s.modes):
                    break
                self.jobs.append(await self._job(f"chaos-{n:02d}", keyed=keyed, chaos=True))
            interrupted = False
        finally:
            self.rss.stop()
            stop_broker(self.broker)
            summary = self.summary(interrupted)
            cf.write_report(summary, self.out)
        return summary

    # ------------------------------------------------------------------ one job

    async def _job(self, name: str, keyed: bool, chaos: bool) -> dict[str, Any]:
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "job.toml").write_text(job_toml(name, self.s))
        wire = cf.Wire(self.broker.host, self.broker.port, name, self.s.agents)
        rng = random.Random(f"{self.s.seed}/{name}")
        kinds = list(FORGERIES[keyed])
        rng.shuffle(kinds)
        job = JobState(name, keyed, chaos, wire, Fleet(self, name, folder, keyed), rng, itertools.cycle(kinds))
        if chaos:
            wire.on_assign = lambda agent, env: self._forge(job, agent, env)
        started = time.monotonic()
        self.say(f"job {name} ({'key' if keyed else 'no key'}{', faults' if chaos else ', no faults'}): starting")
        job.tasks.append(asyncio.create_task(wire.run()))
        code: int | None = None
        try:
            await until(lambda: wire.connected, 30)
            for role in (COORDINATOR, *self.s.agents):
                job.fleet.start(role)
            if chaos:
                job.tasks += [asyncio.create_task(self._process_faults(job)), asyncio.create_task(self._garbage(job))]
            await until(lambda: job.fleet.finished() is not None, self.s.job_timeout_s, 0.2)
            code = job.fleet.finished()
            await until(lambda: all(p.poll() is not None for p in job.fleet.procs.values()), 30, 0.2)
        finally:
            for task in job.tasks:
                task.cancel()
            await asyncio.gather(*job.tasks, return_exceptions=True)
            stragglers = [r for r, p in job.fleet.procs.items() if p.poll() is None]
            job.fleet.stop_all()
        record = self._evaluate(job, code, time.monotonic() - started, stragglers)
        self.say(f"job {name}: {record['verdict']}", job=name, record=record)
        return record

    # ------------------------------------------------------------------ the faults

    def _next_kind(self) -> str:
        if not self._kinds:
            self._kinds = list(PROCESS_FAULTS)
            self.rng.shuffle(self._kinds)
        return self._kinds.pop(0)

    async def _process_faults(self, job: JobState) -> None:
        wire, seen = job.wire, 0
        while True:
            await until(functools.partial(_moved_on, wire, seen), 1e9)
            if wire.done:
                return
            seen = wire.round
            covered = all(self.faults[k] for k in PROCESS_FAULTS)
            if seen >= self.s.rounds or (covered and job.rng.random() >= self.s.fault_rate):
                continue
            kind = self._next_kind()
            times = [float(m.get("round_time_s") or 0) for _, _, m in wire.metrics] or self._reference_times()
            await asyncio.sleep(job.rng.uniform(0.1, 0.8) * sorted(times)[len(times) // 2])
            if wire.done or _fault_round(wire) >= self.s.rounds:
                self._kinds.insert(0, kind)  # not used (never in a job's last round): the next job gets it
                continue
            fault = await self._inject(job, kind)
            seen = wire.round + 1  # a quiet round in between: every member listens to the garbage for a while
            if not fault.recovered:
                return  # the fleet is not back: no more faults in this job

    def _reference_times(self) -> list[float]:
        return [float(t) for t in self.reference.get("round_times_s", [])] or [2.0]

    async def _inject(self, job: JobState, kind: str) -> Fault:
        wire, fleet, rng, agents = job.wire, job.fleet, job.rng, self.s.agents
        target = rng.choice(agents) if kind == "agent_kill" else ("broker" if kind == "broker_restart" else COORDINATOR)
        fault = Fault(kind, target, _fault_round(wire), time.monotonic())
        job.faults.append(fault)
        self.faults[kind] += 1
        old, connects = wire.members[target].sid if target in wire.members else None, wire.connects
        if kind == "broker_restart":
            await asyncio.to_thread(stop_broker, self.broker)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            self.broker = await asyncio.to_thread(self._restart_broker)
        else:
            pid = fleet.kill(target)
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            fleet.start(target, resume=target == COORDINATOR)
            self.say(f"  {job.name} round {fault.round}: killed {target} (pid {pid}) and started it again")

        def back() -> bool:
            if fleet.finished() is not None:
                return True  # the coordinator ended by itself: the job's record says how
            members = wire.members
            new = kind == "broker_restart" and wire.connects > connects
            new = new or (kind != "broker_restart" and members[target].sid not in (None, old))
            listening = all(m.listening for m in members.values())
            return new and listening and wire.completed_since(fault.start) >= fault.round

        fault.recovered = await until(back, RECOVERY_S) and fleet.finished() is None
        fault.end = time.monotonic()
        state = f"back in {fault.end - fault.start:.1f} s" if fault.recovered else "NOT back"
        self.say(f"  {job.name} round {fault.round}: {kind} {target}: {state}", fault=fault.report(self.t0))
        return fault

    def _restart_broker(self) -> Broker:
        for _ in range(9):  # the port may take a moment to be free again
            with contextlib.suppress(RuntimeError):
                return start_mosquitto(self.out / "broker", self.broker.port)
            time.sleep(0.5)
        return start_mosquitto(self.out / "broker", self.broker.port)

    async def _garbage(self, job: JobState) -> None:
        rng = random.Random(f"{self.s.seed}/{job.name}/garbage")
        while not job.wire.done:
            for label, topic, payload, receivers, reason in cf.garbage(job.name, self.s.agents, rng, job.keyed):
                await job.wire.publish(label, topic, payload, receivers, reason)
            job.garbage_bursts += 1
            self.faults["garbage"] += 1
            await asyncio.sleep(self.s.garbage_period_s * rng.uniform(0.5, 1.5))

    def _forge(self, job: JobState, agent: str, assign: Envelope) -> None:
        """Once a round: a forged upload for one agent (seeded by the round), as soon as its assignment is seen."""
        r = assign.round
        target = random.Random(f"{self.s.seed}/{job.name}/forge/{r}").choice(self.s.agents)
        if r in job.forged_rounds or agent != target or "adapter" not in assign.body:
            return
        job.forged_rounds.add(r)
        kind = next(job.forge_kinds)
        key = job.rng.randbytes(32) if kind == "wrong_key" else None
        payload = cf.forged_upload(job.name, agent, assign, kind, job.rng, key)
        reason = {"wrong_key": "bad_auth", "unsigned": "unauthenticated"}.get(kind)
        forgery = {"kind": kind, "agent": agent, "round": r, "corr": assign.corr, "t": time.monotonic()}
        job.forgeries.append(forgery)
        self.faults[f"forged_{kind}"] += 1

        async def send() -> None:
            topic = job.wire.topics.agent(agent, "adapter")
            forgery["sent"] = await job.wire.publish(f"forged_{kind}", topic, payload, (COORDINATOR,), reason)
            forgery["t"] = time.monotonic()
            self.say(
                f"  {job.name} round {r}: forged upload for {agent} ({kind}){'' if forgery['sent'] else ': not sent'}"
            )

        job.tasks.append(asyncio.create_task(send()))

    # ------------------------------------------------------------------ the outcome

    def _evaluate(self, job: JobState, code: int | None, seconds: float, stragglers: list[str]) -> dict[str, Any]:
        wire, fleet, s = job.wire, job.fleet, self.s
        metrics = cf.read_metrics(fleet.out / "metrics.jsonl")
        rounds = [m.get("round") for m in metrics]
        failed = [m for m in metrics if m.get("failed") or "eval_loss" not in m]
        adapter = fleet.out / "adapter" / "adapter_model.safetensors"
        finished = code == 0 and rounds == list(range(s.rounds + 1)) and not failed and adapter.is_file()
        record: dict[str, Any] = {
            "job": job.name, "keyed": job.keyed, "chaos": job.chaos, "seconds": round(seconds, 1), "exit_code": code,
            "finished": finished, "rounds_logged": rounds, "failed_lines": failed,
            "attempts": {str(m["round"]): m.get("attempt", 1) for m in metrics if m.get("round")},
            "round_times_s": [m["round_time_s"] for m in metrics if m.get("round_time_s") is not None],
        }  # fmt: skip
        if job.chaos:
            ref = self.out / "chaos-ref" / "out" / "adapter" / "adapter_model.safetensors"
            record["adapter_equal"], record["adapter_diff"] = cf.compare_adapters(ref, adapter)
        processes: dict[str, list[int | None]] = {}
        for role, p in fleet.history:
            processes.setdefault(role, []).append(p.returncode)
        record["exit_codes"], record["stragglers"] = processes, stragglers  # stragglers: killed after the job
        clean_exits = all(codes[-1] == 0 for codes in processes.values()) and not stragglers
        # Refusals: metrics.jsonl's last line (every coordinator process up to its last round: a resumed one carries
        # the counts of those before it in its checkpoint), and the members' logs (every process, to the end).
        record["rejected_last_line"] = metrics[-1].get("rejected", {}) if metrics else {}
        logs = {role: cf.logged_refusals(fleet.logs / f"{role}.log") for role in (COORDINATOR, *s.agents)}
        counted = {role: sum(procs, Counter()) for role, (procs, _) in logs.items()}
        record["refusals_logged"] = {role: dict(c) for role, c in counted.items()}
        record["agent_refusals_by_kind"] = {a: dict(logs[a][1]) for a in s.agents}
        logged = counted[COORDINATOR]
        record["metrics_not_in_log"] = {
            r: n - logged[r] for r, n in record["rejected_last_line"].items() if n > logged[r]
        }
        windows = [(f.target, f.start, f.end or math.inf) for f in job.faults]
        record["accounting"] = cf.accounting(wire, windows, counted, {a: logs[a][1] for a in s.agents}, s.agents)
        record["forgeries"] = cf.forgery_outcomes(wire, job.forgeries, counted[COORDINATOR])
        record["faults"] = [f.report(self.t0) for f in job.faults]
        kinds = Counter(f.kind for f in job.faults) + Counter(f"forged_{f['kind']}" for f in job.forgeries)
        record["faults_by_kind"] = dict(kinds + Counter({"garbage": job.garbage_bursts}))
        record["garbage_sent"] = dict(Counter(x.label for x in wire.sent))
        record["peak_rss_mb"] = self.rss.peaks.get(job.name, {})
        uncounted = record["forgeries"]["uncounted"] or any(
            a["uncounted"] or a["short"] for a in record["accounting"].values()
        )
        record["survived"] = finished and clean_exits and all(f.recovered for f in job.faults)
        equal = record.get("adapter_equal", True)
        record["ok"] = record["survived"] and equal and not uncounted and not record["metrics_not_in_log"]
        verdict = [f"finished in {seconds:.0f} s" if finished else f"NOT finished (exit {code}, rounds {rounds})"]
        if job.chaos:
            verdict.append("adapter equal to the reference" if equal else f"adapter DIFFERS: {record['adapter_diff']}")
        verdict += [f"{k} {v}" for k, v in sorted(record["faults_by_kind"].items()) if v]
        agents_counted = sum(sum(counted[a].values()) for a in s.agents)
        verdict.append(f"refusals logged: coordinator {sum(counted[COORDINATOR].values())}, agents {agents_counted}")
        verdict += ["UNCOUNTED refusals (see accounting)"] if uncounted else []
        verdict += ["" if record["survived"] else "NOT survived"]
        record["verdict"] = "; ".join(v for v in verdict if v)
        return record

    def summary(self, interrupted: bool) -> dict[str, Any]:
        jobs = self.jobs
        total: Counter[str] = Counter()
        for j in jobs:
            total += Counter(j["rejected_last_line"])
        peaks: dict[str, float] = {}
        for scope, roles in self.rss.peaks.items():
            for role, mib in roles.items():
                if scope != "chaos-ref":
                    peaks[role] = max(peaks.get(role, 0.0), mib)
        faults = [f for j in jobs for f in j["faults"]]
        probes: Counter[str] = Counter()
        for j in jobs:
            for agent in self.s.agents:
                probes.update(j["accounting"][agent]["probes"])  # (update keeps the zeros)
        return {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.s).items()},
            "interrupted": interrupted, "elapsed_s": round(time.monotonic() - self.t0, 1), "reference": self.reference,
            "jobs_run": len(jobs), "jobs_finished": sum(j["finished"] for j in jobs),
            "adapters_equal": sum(bool(j.get("adapter_equal")) for j in jobs),
            "faults_by_kind": {k: self.faults[k] for k in FAULT_KINDS},
            "process_faults_survived": f"{sum(f['recovered'] for f in faults)}/{len(faults)}",
            "refusals_last_lines": dict(total),
            "refusals_logged": {role: dict(sum((Counter(j["refusals_logged"][role]) for j in jobs), Counter()))
                                for role in (COORDINATOR, *self.s.agents)},
            "uncounted": sum(sum(a["uncounted"].values()) + a["short"] for j in jobs for a in j["accounting"].values())
            + sum(sum(j["forgeries"]["uncounted"].values()) for j in jobs),
            "forgery_outcomes": dict(sum((Counter(j["forgeries"]["outcomes"]) for j in jobs), Counter())),
            "agent_probes": dict(probes),
            "peak_rss_mb": peaks, "peak_rss_mb_reference": self.rss.peaks.get("chaos-ref", {}),
            "ok": bool(jobs) and not interrupted and all(j["ok"] for j in jobs) and bool(self.reference.get("finished")),
            "jobs": jobs,
        }  # fmt: skip


def run_soak(settings: ChaosSettings) -> dict[str, Any]:
    """Run the soak (asyncio inside); Ctrl-C ends every process it started and still writes the summary."""
    return asyncio.run(Soak(settings).run())
