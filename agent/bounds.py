"""What each of an agent's topics may carry now: the most bytes a message may decompress to, from the job's
shapes. The link asks before it decompresses anything (shared/wire/inbound.py), as the coordinator's does, so
that a flood of zstd bombs on a device's topics costs it a header read each, not its memory.

* the coordinator's status, a notice, a round's start or end: control messages, 64 KiB at most;
* an assignment: its adapters at the job's highest LoRA rank (the coordinator's status says it) on every
  matrix of the model, in fp32, and with private adapters (the status gives their blocks) up to 256 sealed
  uploads of those blocks' adapters; nothing before the coordinator's status is known;
* a gradient, the U split's tail activations: (B, T, C) in fp32 at the assignment's shape, only while an
  assignment is being trained (``unexpected`` otherwise).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from splitft.shared.model.loading import hidden_size, num_layers
from splitft.shared.model.split import matrix_dims
from splitft.shared.wire.control import Assignment, CoordinatorStatus
from splitft.shared.wire.inbound import ENVELOPE_BYTES, SMALL_MESSAGE_BYTES, step_message_bytes
from splitft.shared.wire.sealed import MAX_SEALED
from splitft.shared.wire.topics import Kind, Topic

#: a LoRA tensor's name and map in msgpack, beside its data
_TENSOR_OVERHEAD = 256
#: a sealed upload's nonce, tag, agent, round and weight beside its adapters
_SEALED_OVERHEAD = 1024


class InboundBounds:
    """``bounds(topic)``: the link's ``expect`` hook for an agent. The agent sets :attr:`status` and
    :attr:`assignment` as they change."""

    def __init__(self, config: PretrainedConfig) -> None:
        self.hidden = hidden_size(config)
        dims = matrix_dims(config)
        self._side_sum = sum(rows + cols for rows, cols in dims)  # LoRA on (r x cols) and (rows x r): r x this
        self._matrices = len(dims)
        self._layers = num_layers(config)
        self.status: CoordinatorStatus | None = None  # the coordinator's latest valid online status
        self.assignment: Assignment | None = None  # the assignment being trained

    def assignment_bytes(self, rank: int, private_blocks: int = 0) -> int:
        """The most an assignment may decompress to: adapters of ``rank`` on every matrix, in fp32, and with private
        adapters up to :data:`MAX_SEALED` sealed uploads of the ``private_blocks`` blocks' adapters."""
        adapters = 4 * rank * self._side_sum + 2 * _TENSOR_OVERHEAD * self._matrices
        sealed = -(-adapters * private_blocks // self._layers) + _SEALED_OVERHEAD if private_blocks else 0
        return ENVELOPE_BYTES + adapters + MAX_SEALED * sealed

    def __call__(self, topic: Topic) -> int | None:
        kind = topic.kind
        if kind in ("coordinator_status", Kind.NOTICE, Kind.ROUND):
            return SMALL_MESSAGE_BYTES
        if kind == Kind.ASSIGN:
            status = self.status
            return None if status is None else self.assignment_bytes(status.lora_rank, status.private_blocks)
        if kind in (Kind.GRAD, Kind.TAIL_ACT):
            a = self.assignment
            return None if a is None else step_message_bytes(a.batch_size, a.max_length, self.hidden)
        return None
