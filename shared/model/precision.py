"""The precision of the frozen base weights: fp32, bf16 or fp16 (``base_dtype``).

A segment's frozen weights are held, and its blocks computed, in its base dtype: bf16 on a GPU host,
fp16 on a Jetson (its tensor cores' precision), fp32 on CPUs without fast half-precision matrix units.
The LoRA weights, their gradients and the optimiser state stay fp32 whatever the base dtype (PEFT casts
a layer's input to the adapter's dtype and its output back), and so do the loss and the head's logits.
On CUDA a half-precision segment also runs under autocast, so that its adapters' products use the
tensor cores too.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from splitft.shared.errors import ConfigError

#: The base dtypes by name.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, what: str = "base_dtype") -> torch.dtype:
    """The torch dtype of a base dtype name; an unknown name is a :class:`ConfigError` naming ``what``."""
    if name not in DTYPES:
        raise ConfigError(f"{what} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to ``dtype`` on a CUDA device with a half-precision base; nothing otherwise (on a CPU the
    adapters stay fp32 and the frozen weights are already in ``dtype``)."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
