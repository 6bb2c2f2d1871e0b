"""What a link checks on a message it receives, beside the envelope's own checks (envelope.py).

Before anything is decompressed (and after the tag, with a job key): that the frame's declared size fits what
its topic may carry now (the owner's ``expect`` hook). After decoding: that the message's type is its topic's,
and that it was not accepted before (a QoS 1 redelivery, a replay). :class:`~splitft.shared.wire.link.Link` refuses
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

#: the most a control message may decompress to: a status, a join (a profile of a few hundred bytes), a notice,
#: a round's start or end
SMALL_MESSAGE_BYTES = 64 << 10
#: room for an envelope and a body's small fields beside its tensors
ENVELOPE_BYTES = 64 << 10


def step_message_bytes(batch_size: int, max_length: int, hidden: int) -> int:
    """The most a step message (activations and labels up; a gradient or the U split's tail activations down)
    may decompress to at a job's shapes: (B, T, C) in fp32, the widest wire dtype, and int32 labels."""
    return ENVELOPE_BYTES + batch_size * max_length * (4 * hidden + 8)


def check_frame(
    topic: Topic, frame: bytes, topic_name: str, limits: Limits, expect: Expect | None
) -> tuple[int, int | None]:
    """Check a compressed frame against what its topic may carry now, before it is decompressed.

    Returns the bytes it will hold in memory, about (what it declares; the topic's bound for a frame that
    declares nothing, which decoding then stops at), and the topic's bound (None: only the link's limits)."""
    declared = declared_size(frame, limits)
    bound = None if expect is None else expect(topic)
    if expect is not None and bound is None:
        raise WireError(Refusal.UNEXPECTED, f"nothing is expected on {topic_name} now ({len(frame)} bytes unread)")
    if declared is not None and bound is not None and declared > bound:
        raise WireError(Refusal.TOO_LARGE, f"frame declares {declared} bytes; {topic.kind} carries at most {bound}")
    held = declared if declared is not None else bound if bound is not None else len(frame)
    return held, bound


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
