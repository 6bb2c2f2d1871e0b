"""What the agent and the coordinator share: errors, the tensor codec, model loading and splitting, LoRA."""

from .codec import (
    FLOAT_WIRE_DTYPES,
    WIRE_DTYPES,
    Limits,
    decode_state,
    decode_tensor,
    encode_state,
    encode_tensor,
    pack,
    unpack,
)
from .errors import ConfigError, ModelError, SplitFTError, WireError
from .lora import LoraSettings, block_ranks, init_lora, load_lora_state, lora_state
from .loss import causal_lm_loss, labels_from
from .models import PRESETS, Family, family_of, load_config
from .split import Segment, SegmentSpec, build_segment

__version__ = "0.1.0"

__all__ = [
    "FLOAT_WIRE_DTYPES",
    "PRESETS",
    "WIRE_DTYPES",
    "ConfigError",
    "Family",
    "Limits",
    "LoraSettings",
    "ModelError",
    "Segment",
    "SegmentSpec",
    "SplitFTError",
    "WireError",
    "__version__",
    "block_ranks",
    "build_segment",
    "causal_lm_loss",
    "decode_state",
    "decode_tensor",
    "encode_state",
    "encode_tensor",
    "family_of",
    "init_lora",
    "labels_from",
    "load_config",
    "load_lora_state",
    "lora_state",
    "pack",
    "unpack",
]
