"""Prometheus metrics of a running job, from the coordinator's progress events.

Names follow Prometheus' conventions (base units, ``_total`` counters, ``_seconds``/``_bytes``). Each
coordinator has a registry of its own (tests run several in one process). The agents report their step
timings once per round, as the mean over the round's steps: ``splitft_step_seconds`` gets one
observation per agent, part and round, that mean.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from splitft.coordinator.observe.fleet import STEP_PARTS, step_parts
from splitft.coordinator.progress import Event

# No `_created` series: they double the exposition of every counter and histogram, and Prometheus does not
# need them (a process-wide setting of prometheus-client; the coordinator's process has no other exporter).
disable_created_metrics()

#: events that change a metric (the others, "step" and "waiting", leave the exposition as it was)
EVENTS = frozenset({Event.AGENT, Event.REJECTED, Event.ROUND_START, Event.ROUND_RETRY, Event.BASELINE, Event.ROUND_END})

#: seconds: from a fast LAN step (10 ms) to a throttled device on cellular (a minute)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class JobMetrics:
    """The Prometheus side of the observer: call :meth:`update` with each progress event."""

    def __init__(self, job: str) -> None:
        self.registry = r = CollectorRegistry()
        # `splitft_job`, not `job`: Prometheus sets `job` itself (the scrape job) and would rename ours
        self.info = Gauge("splitft_job_info", "The job being run (always 1).", ["splitft_job"], registry=r)
        self.info.labels(splitft_job=job).set(1)
        self.round = Gauge("splitft_round", "The round running (or last run).", registry=r)
        self.rounds = Counter("splitft_rounds_completed_total", "Rounds applied (evaluated and written).", registry=r)
        self.retries = Counter("splitft_round_retries_total", "Round attempts rolled back.", registry=r)
        self.round_seconds = Histogram(
            "splitft_round_seconds", "Wall time of each round.", registry=r,
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )  # fmt: skip
        self.eval_loss = Gauge("splitft_eval_loss", "Evaluation loss after the last round (nats/token).", registry=r)
        self.eval_ppl = Gauge("splitft_eval_perplexity", "Evaluation perplexity after the last round.", registry=r)
        self.eval_acc = Gauge("splitft_eval_accuracy", "Next-token accuracy on the evaluation set.", registry=r)
        self.train_loss = Gauge("splitft_train_loss", "Mean training loss of the last round.", registry=r)
        self.tokens = Counter("splitft_train_tokens_total", "Tokens trained on.", registry=r)
        self.bytes = Counter(
            "splitft_bytes_total", "Bytes on the wire between the devices and the coordinator.", ["direction"],
            registry=r,
        )  # fmt: skip
        self.agent_bytes = Counter(
            "splitft_agent_bytes_total", "Bytes on the wire per device.", ["agent", "direction"], registry=r
        )
        self.step = Histogram(
            "splitft_step_seconds", "A device's mean step time in a round, by part (total, " + ", ".join(STEP_PARTS)
            + ").", ["agent", "part"], buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "splitft_messages_rejected_total", "Messages refused, by reason (OPERATIONS.md explains each).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.dropped = Counter("splitft_agents_dropped_total", "Devices dropped from a round.", registry=r)
        self.online = Gauge("splitft_agents_online", "Devices online.", registry=r)
        self.cut = Gauge("splitft_agent_cut", "The cut layer each device holds this round.", ["agent"], registry=r)
        self.tail = Gauge("splitft_agent_tail", "U split: the top blocks each device holds.", ["agent"], registry=r)
        self.predicted = Gauge(
            "splitft_controller_predicted_step_seconds", "The controller's predicted step time.", registry=r
        )
        self.ideal = Gauge(
            "splitft_controller_ideal_step_seconds", "The controller's ideal (bound) step time.", registry=r
        )
        self.achieved = Gauge(
            "splitft_step_achieved_seconds", "The last round's slowest mean step time, as the coordinator times it.",
            registry=r,
        )  # fmt: skip
        # Not known before the first evaluation or decision: NaN (no value), not a 0 that a graph would draw.
        for gauge in (self.eval_loss, self.eval_ppl, self.eval_acc, self.train_loss, self.predicted, self.ideal,
                      self.achieved):  # fmt: skip
            gauge.set(float("nan"))
        self._online: set[str] = set()
        self._version = 0  # bumped by every change; the exposition is made again only after one
        self._exposed: tuple[int, bytes] = (-1, b"")

    def update(self, event: Event, data: dict[str, Any]) -> None:
        if event in EVENTS:
            self._version += 1
        if event == Event.AGENT:
            (self._online.add if data["online"] else self._online.discard)(data["name"])
            self.online.set(len(self._online))
        elif event == Event.REJECTED:
            self.rejected.labels(reason=data["reason"]).inc()
        elif event == Event.ROUND_START:
            self.round.set(data["round"])
            tails = data.get("tails") or {}
            for name, cut in data["cuts"].items():
                self.cut.labels(agent=name).set(cut)
                if name in tails:
                    self.tail.labels(agent=name).set(tails[name])
        elif event == Event.ROUND_RETRY:
            self.retries.inc()
        elif event in (Event.BASELINE, Event.ROUND_END):
            self._evaluated(data)
            if event == Event.ROUND_END:
                self._round_end(data)

    def _evaluated(self, record: dict[str, Any]) -> None:
        self.eval_loss.set(record["eval_loss"])
        self.eval_ppl.set(record["eval_ppl"])
        self.eval_acc.set(record["eval_acc"])

    def _round_end(self, record: dict[str, Any]) -> None:
        self.rounds.inc()
        self.round_seconds.observe(record["round_time_s"])
        if record.get("train_loss") is not None:
            self.train_loss.set(record["train_loss"])
        self.tokens.inc(record["train_tokens"])
        self.bytes.labels(direction="up").inc(record["bytes_up"])
        self.bytes.labels(direction="down").inc(record["bytes_down"])
        self.achieved.set(record["step_time_s"])
        for name, a in record["agents"].items():
            self.agent_bytes.labels(agent=name, direction="up").inc(a["bytes_up"])
            self.agent_bytes.labels(agent=name, direction="down").inc(a["bytes_down"])
            if a["dropped"] is not None:
                self.dropped.inc()
                continue
            timings = a.get("timings") or {}
            if timings:
                self.step.labels(agent=name, part="total").observe(timings.get("step_s", a["step_time_s"]))
                for part, seconds in step_parts(timings, a["server_s"]).items():
                    self.step.labels(agent=name, part=part).observe(seconds)
        decision = record.get("controller")
        if decision is not None:
            self.predicted.set(decision["predicted_step_s"])
            self.ideal.set(decision["ideal_step_s"])

    def exposition(self) -> bytes:
        """The text exposition format (what ``/metrics`` serves). Made once per change: with 50 agents it
        takes about 25 ms, and Prometheus may scrape more often than the metrics change (once a round)."""
        version, text = self._exposed
        if version != self._version:
            text = generate_latest(self.registry)
            self._exposed = (self._version, text)
        return text
