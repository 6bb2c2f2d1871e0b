"""What each side holds: the blocks and LoRA ranks of a device at its cut (and tail), of the server's global copy,
and the block a LoRA weight belongs to."""

from __future__ import annotations

from collections.abc import Sequence

from splitft.shared.model.lora import LoraSettings, block_ranks
from splitft.shared.model.split import SegmentSpec


def global_ranks(total: int, cuts: Sequence[int | Sequence[int]], lora: LoraSettings) -> dict[int, int]:
    """LoRA rank of each block of the global (server) copy.

    ``cuts`` holds one entry per device (or per distinct layout): its cut, or the list of its cut layers
    (a U-shaped device has two, ``c`` and ``L-k``). With one layout for all devices this is the paper's:
    ``r_cut`` on both sides of each cut. With several, a block keeps ``r_cut`` only if it is at a cut of
    *every* device; elsewhere it gets ``r``, so the global copy can hold what every holder contributes
    (devices cut at that block hold it at ``r_cut`` and are converted, see ``aggregation``).
    """
    if not cuts:
        return block_ranks(total, [], lora)
    layouts = [[c] if isinstance(c, int) else list(c) for c in cuts]
    ranks = dict.fromkeys(range(total), lora.r)
    for j in range(total):
        if all(any(j in (c - 1, c) for c in layout) for layout in layouts):
            ranks[j] = lora.r_cut
    return ranks


def device_layout(total: int, cut: int, tail: int) -> SegmentSpec:
    """What a device cut at ``cut`` with a tail of ``tail`` blocks holds (``tail`` 0: the two-part client's blocks)."""
    return SegmentSpec.u_device(cut, tail, total) if tail else SegmentSpec.client(cut)


def device_ranks(total: int, cut: int, tail: int, lora: LoraSettings) -> dict[int, int]:
    """LoRA rank of each block a device holds: ``0..cut-1`` and, in the U split, the last ``tail``."""
    spec = device_layout(total, cut, tail)
    ranks = block_ranks(total, spec.cuts(total), lora)
    return {j: ranks[j] for j in spec.blocks(total)}
