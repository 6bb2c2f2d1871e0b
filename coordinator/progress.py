"""What a running coordinator reports as it goes: one :class:`Event` and its data, to a :data:`Progress` callback
(the command line's progress bar, the dashboard, Prometheus, TensorBoard, the study's harness)."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any


class Event(StrEnum):
    WAITING = "waiting"  # for agents: online, needed
    ADMITTED = "admitted"  # enough agents joined: agents
    RESUMED = "resumed"  # from a checkpoint: checkpoint, round, digest
    BASELINE = "baseline"  # round 0's evaluation: its metrics line
    ROUND_START = "round_start"  # round, cuts (and tails in the U split)
    STEP = "step"  # a local step of every agent is done: round, step, of
    ROUND_RETRY = "round_retry"  # a round rolled back: round, attempt, reason
    ROUND_END = "round_end"  # the round's metrics line
    DONE = "done"  # the job's summary: adapter, metrics, rounds
    AGENT = "agent"  # an agent joined, rejoined or went offline: name, online, profile
    REJECTED = "rejected"  # a message refused: reason, agent or topic
    WORKER_LOST = "worker_lost"  # a coordinator worker is gone: round, error
    FAILED = "failed"  # the job ended with an error (the dashboard reports it): error


#: the callback: (event, data)
Progress = Callable[[Event, dict[str, Any]], None]


def silent(event: Event, data: dict[str, Any]) -> None:
    """A :data:`Progress` that reports nothing."""
