"""The memory a device's part of the model needs, from the figures the device measures when it joins.

An agent measures, at the job's batch shape and in its own base dtype (agent/profile.py): its runtime
(the process before any segment: Python, torch, the tokenizer, its data), the embeddings' weights, one
block (frozen weights, LoRA weights with their gradients and AdamW's two moments) and that block's saved
activations for one training step, the head (the final norm and LM head weights the embeddings do not
already hold, and the chunked head's working memory: shared/model/loss.py), a step's messages, and the largest
tensor as stored (it is read, and cast, while the rest is held). The
coordinator plans cuts from them (:meth:`MemoryFigures.blocks_that_fit`) and refuses, at join, a device
that cannot hold the shallowest cut the job allows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: What an agent's process takes before it builds a segment when it shares its process with others (the
#: tests' and agent_fleet's in-process agents): Python, torch, transformers and a tokenizer, measured here
#: at 410-450 MiB. An agent alone in its process reports its own resident memory instead.
SHARED_PROCESS_RUNTIME_MB = 450.0

#: Headroom kept free of the plan: the transient buffers the figures miss.
HEADROOM = 0.1

#: Resident memory per block of activations, over the bytes autograd keeps: the allocator holds on to the
#: forward pass's freed temporaries. Measured (scripts/bench_memory.py, SmolLM2, cuts 2 to 8, B=4, T=256):
#: 1.6x in fp32, 1.4x in bf16 and fp16; planned with 1.7x.
ACTIVATION_OVERHEAD = 1.7


@dataclass(frozen=True)
class MemoryFigures:
    """A device's memory, in MiB, as it reports it in its join profile (the ``memory_*`` fields)."""

    usable_mb: float  # what the device can use in all
    runtime_mb: float  # its process before any segment
    embed_mb: float  # the embeddings' weights
    block_mb: float  # one block: frozen weights, LoRA weights, their gradients and optimiser state
    act_mb: float  # one block's activations kept for the backward pass, one step at the job's shape
    head_mb: float  # the U split's head: weights not shared with the embeddings, and the chunked head's peak
    io_mb: float  # a step's messages: the activations and gradients as tensors and as bytes
    load_mb: float  # the largest tensor as stored: read (and cast) while the rest of the part is held

    def need_mb(self, blocks: int, head: bool) -> float:
        """The memory the device needs to train ``blocks`` blocks (and the head, in the U split)."""
        part = self.embed_mb + blocks * self.per_block_mb + self.io_mb + (self.head_mb if head else 0.0)
        part += self.load_mb
        return self.runtime_mb + part * (1 + HEADROOM)

    @property
    def per_block_mb(self) -> float:
        """One more block: its weights and LoRA state, and its activations as resident memory."""
        return self.block_mb + self.act_mb * ACTIVATION_OVERHEAD

    def blocks_that_fit(self, head: bool) -> int:
        """The most blocks the device can train (0 when not even one fits)."""
        per_block = self.per_block_mb * (1 + HEADROOM)
        room = self.usable_mb - self.need_mb(0, head)
        if per_block <= 0:
            return 1 << 30
        return max(0, math.floor(room / per_block + 1e-9))

    def to_profile(self) -> dict[str, float]:
        return {f"memory_{k}": round(v, 3) for k, v in asdict(self).items()}

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> MemoryFigures | None:
        """The figures of a join profile, or None when it lacks any of them (an agent that did not measure)."""
        values = {}
        for name in cls.__dataclass_fields__:
            value = profile.get(f"memory_{name}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return None
            values[name] = float(value)
        return cls(**values)


#: The join profile's memory fields (numbers >= 0).
PROFILE_FIELDS = frozenset(f"memory_{name}" for name in MemoryFigures.__dataclass_fields__)


def shortfall(figures: MemoryFigures, model: str, blocks: int, head: bool, where: str) -> str | None:
    """Why a device cannot train ``blocks`` blocks (``where`` names the cut), or None when it can."""
    need = figures.need_mb(blocks, head)
    if need <= figures.usable_mb:
        return None
    return (
        f"{model} needs {need:,.0f} MiB on this device at {where} (runtime {figures.runtime_mb:,.0f}, embeddings "
        f"{figures.embed_mb:,.0f}, {blocks} x {figures.per_block_mb:,.1f} per block with its "
        f"activations{f', head {figures.head_mb:,.0f}' if head else ''}, messages {figures.io_mb:,.0f}, "
        f"loading {figures.load_mb:,.0f}, {HEADROOM:.0%} headroom) and it has {figures.usable_mb:,.0f} MiB usable: give it a smaller base dtype "
        "(--dtype fp16 or bf16), a smaller batch_size or max_length, or a smaller model"
    )
