"""A FIFO queue bounded in bytes, per sender and in total: what waits to be handled cannot grow without end.

The receiving side of a link queues what the network hands it until the runtime takes it. An unbounded
queue lets anyone with broker access grow the receiver's memory with messages nobody reads; a queue of
fixed length does not bound memory either, since messages differ in size by six orders of magnitude.
:class:`ByteQueue` counts the bytes each sender holds in the queue and all senders together, and refuses
what would cross either bound (the caller counts the refusal). A sender that holds nothing may always
queue one message, whatever its size: a bound below one honest message never locks a sender out, and
the memory held stays below the bounds plus one message per sender.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Generic, TypeVar

from splitft.shared.errors import ConfigError

T = TypeVar("T")


class ByteQueue(Generic[T]):
    """``offer`` to put (False: refused, over a bound), ``get`` / ``get_nowait`` to take, oldest first."""

    def __init__(self, per_sender_bytes: int, total_bytes: int) -> None:
        if per_sender_bytes <= 0 or total_bytes <= 0:
            raise ConfigError(f"queue bounds must be positive, got {per_sender_bytes} and {total_bytes}")
        self.per_sender_bytes = per_sender_bytes
        self.total_bytes = total_bytes
        self._queue: asyncio.Queue[tuple[str, T, int]] = asyncio.Queue()
        self._held: Counter[str] = Counter()
        self._total = 0

    def offer(self, sender: str, item: T, size: int) -> bool:
        """Queue ``item`` (``size`` bytes) from ``sender`` unless that crosses a bound; True if queued."""
        held = self._held[sender]
        if held and held + size > self.per_sender_bytes:
            return False
        if self._total and self._total + size > self.total_bytes:
            return False
        self._held[sender] = held + size
        self._total += size
        self._queue.put_nowait((sender, item, size))
        return True

    async def get(self) -> T:
        return self._release(await self._queue.get())

    def get_nowait(self) -> T:
        """The oldest item; raises ``asyncio.QueueEmpty`` when there is none."""
        return self._release(self._queue.get_nowait())

    def _release(self, entry: tuple[str, T, int]) -> T:
        sender, item, size = entry
        self._held[sender] -= size
        if self._held[sender] <= 0:
            del self._held[sender]
        self._total -= size
        return item

    def empty(self) -> bool:
        return self._queue.empty()

    def qsize(self) -> int:
        return self._queue.qsize()

    @property
    def bytes(self) -> int:
        """The bytes queued, all senders together."""
        return self._total

    def held(self, sender: str) -> int:
        """The bytes ``sender`` has in the queue."""
        return self._held.get(sender, 0)
