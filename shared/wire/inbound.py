"""What a link checks on a message it receives, beside the envelope's own checks (envelope.py).

Before anything is decompressed: that the frame's declared size fits what its topic may carry now
(the owner's ``expect`` hook). After decoding: that the message's type is its topic's, and that it was
not accepted before (a QoS 1 redelivery, a replay). :class:`~splitft.shared.wire.link.Link` refuses
what fails with the :class:`~splitft.shared.errors.WireError`'s reason.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from splitft.shared.errors import Refusal, WireError
from splitft.shared.wire.codec import Limits, declared_size
from splitft.shared.wire.topics import Kind, Topic

#: ``expect(topic)``: the most bytes a message on ``topic`` may decompress to now, or None when nothing is
#: expected on it (refused ``unexpected`` without being decompressed)
Expect = Callable[[Topic], "int | None"]


def check_frame(
    topic: Topic, payload: bytes, topic_name: str, limits: Limits, expect: Expect | None
) -> tuple[int, int | None]:
    """Check a frame against what its topic may carry now, before it is decompressed.

    Returns the bytes it declares and the topic's bound (None: only the link's limits)."""
    declared = declared_size(payload, limits)
    if expect is None:
        return declared, None
    bound = expect(topic)
    if bound is None:
        raise WireError(Refusal.UNEXPECTED, f"nothing is expected on {topic_name} now ({declared} bytes unread)")
    if declared > bound:
        raise WireError(Refusal.TOO_LARGE, f"frame declares {declared} bytes; {topic.kind} carries at most {bound}")
    return declared, bound


def check_type(type_: str, topic: Topic, *, chunk_ok: bool) -> None:
    """Each topic carries one message type (the runtimes dispatch on the topic, so the two must agree)."""
    expected = Kind.STATUS if topic.kind == "coordinator_status" else topic.kind
    if type_ != expected and not (chunk_ok and type_ == Kind.CHUNK):
        raise WireError(Refusal.WRONG_TYPE, f"a {type_!r} message on a {topic.kind!r} topic")


class SeenMessages:
    """The keys of the latest ``capacity`` messages accepted (an envelope's ``key``: sender, session, sequence)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[tuple[str, str, int], None] = OrderedDict()

    def add(self, key: tuple[str, str, int]) -> None:
        """Remember ``key``; refuse it (``duplicate``) if it was seen before."""
        if key in self._keys:
            raise WireError(Refusal.DUPLICATE, f"message {key} seen before")
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
