"""One process's place in a job, the same for the coordinator, a coordinator worker and an agent: its link to the
broker, the task that reads what arrives, the one thread that computes, and the sends in the background.

::

    member = Member("coordinator")
    async with member.connected(broker, topics, COORDINATOR, subscriptions, read=handle, ...) as link:
        ...                                   # the member's work: await member.compute(fn, ...), member.spawn(send)
    # left: the reader stopped, the compute thread shut down, background sends cancelled

All model work runs on one thread: a model is not shared between threads, and torch keeps one OpenMP pool per
calling thread (several pools on few cores spin against each other). The reader (``read``, given every message
the link accepted) runs in a TaskGroup beside the member's work: should it fail, the work stops with its error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.topics import Topic, Topics

log = logging.getLogger(__name__)
T = TypeVar("T")


class Member:
    """A link, a reader, a compute thread and background sends, opened and closed together. Benchmarks time the
    model work by overriding :meth:`compute` and handing the member to the coordinator or worker."""

    def __init__(self, thread_name: str = "splitft-compute") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._background: set[asyncio.Task[Any]] = set()
        self.link: Link | None = None  # while connected

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread; the event loop goes on reading the network meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a send in the background (notices, re-sends); failures are logged, never raised."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    def connected_link(self) -> Link:
        """The link, for work that runs only while connected."""
        if self.link is None:
            raise RuntimeError("this member is not connected to the broker")
        return self.link

    @asynccontextmanager
    async def connected(
        self,
        broker: BrokerSettings,
        topics: Topics,
        name: str,
        subscriptions: Sequence[str],
        *,
        read: Callable[[Received], Awaitable[None]] | None = None,
        will: tuple[str, dict[str, Any]] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        expect: Callable[[Topic], int | None] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> AsyncIterator[Link]:
        """Connect, start the reader (``read``, if given), and yield the link; on the way out, in this order: the
        reader stops, the compute thread is shut down (its running call finishes on its own), background sends
        are cancelled."""
        async with Link(
            broker, topics, name, subscriptions, will=will, on_connect=on_connect, expect=expect, on_reject=on_reject
        ) as link:
            self.link = link
            try:
                if read is None:
                    yield link
                else:
                    try:
                        async with asyncio.TaskGroup() as group:
                            reader = group.create_task(self._read(link, read), name=f"{name}-reader")
                            try:
                                yield link
                            finally:
                                reader.cancel()
                    except BaseExceptionGroup as failed:
                        raise failed.exceptions[0] from None
            finally:
                self.close()

    def close(self) -> None:
        """Stop computing and sending (what a run does on its way out; safe to call twice)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for task in list(self._background):
            task.cancel()

    @staticmethod
    async def _read(link: Link, read: Callable[[Received], Awaitable[None]]) -> None:
        while True:
            await read(await link.receive())


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background send failed: %s", task.exception())
