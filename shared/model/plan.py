"""The split plan of a model at a cut: what each side holds and what crosses the wire."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitft.shared.model.loading import check_weights, family_of, hidden_size, load_config, num_layers
from splitft.shared.model.lora import LoraSettings, block_ranks
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES, wire_bytes_per_element


@dataclass(frozen=True)
class SidePlan:
    name: str  # "client" or "server"
    spec: SegmentSpec
    base_params: int  # frozen parameters held on this side
    lora_params: int  # trainable LoRA parameters on this side
    ranks: dict[int, int]  # LoRA rank per block held


@dataclass(frozen=True)
class SplitPlan:
    source: str
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    cut: int
    client: SidePlan
    server: SidePlan
    #: bytes per token of one activation (or activation-gradient) tensor, before compression
    activation_bytes_per_token: dict[str, float]


def plan_split(source: str | Path, cut: int, lora: LoraSettings | None = None) -> SplitPlan:
    """Size both sides of the split without loading weights from a folder (they stay on ``meta``)."""
    lora = lora or LoraSettings()
    config = load_config(source)
    check_weights(source, config)  # a config over another model's weights is refused here
    total = num_layers(config)
    ranks = block_ranks(total, [cut], lora)
    sides = []
    for name, spec in (("client", SegmentSpec.client(cut)), ("server", SegmentSpec.server(cut, total))):
        segment = build_segment(source, spec, lora=lora, ranks=ranks, load_weights=False)
        sides.append(_side(name, segment))
    width = hidden_size(config)
    return SplitPlan(
        source=str(source),
        family=family_of(config).name,
        model_type=config.model_type,
        num_layers=total,
        hidden_size=width,
        vocab_size=int(config.vocab_size),
        cut=cut,
        client=sides[0],
        server=sides[1],
        activation_bytes_per_token={w: width * wire_bytes_per_element(w, width) for w in FLOAT_WIRE_DTYPES},
    )


def _side(name: str, segment: Segment) -> SidePlan:
    lora_params = sum(p.numel() for p in segment.lora_parameters().values())
    all_params = sum(p.numel() for p in segment.peft_model.parameters())
    return SidePlan(name, segment.spec, all_params - lora_params, lora_params, dict(segment.ranks))
