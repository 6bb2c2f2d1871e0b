"""LoRA through PEFT: per-block ranks, deterministic initialisation, adapter state by name.

Ranks: every block gets ``r`` except the blocks on both sides of a cut (the device's last block and
the server's first), which get the lower ``r_cut``: those are the adapters that move when a cut
moves, and a lower rank makes that traffic smaller. ``lora_alpha`` is set per block to
``alpha_per_rank * rank`` so that the LoRA scaling ``alpha / r`` is the same at every rank.

Adapter state names are PEFT's saved names (``base_model.model.<module>.lora_A.weight``), the same
in every segment and in the unsplit model, so segments exchange, average and export adapters by
name without translation.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from splitft.shared.errors import ConfigError
from splitft.shared.model.loading import Family

_ADAPTER = "default"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters of a job."""

    r: int = 16  # rank of every block away from a cut
    r_cut: int = 8  # rank of the blocks on both sides of a cut (paper: 8)
    alpha_per_rank: float = 2.0  # lora_alpha = alpha_per_rank * rank: the same scaling at every rank
    dropout: float = 0.0  # LoRA dropout; 0 keeps split and whole bit-comparable
    targets: tuple[str, ...] | None = None  # module names in a block; None = the family's default

    def __post_init__(self) -> None:
        # Exact types: these also arrive from the wire (assignments), where True is not a rank.
        for name in ("r", "r_cut"):
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= 4096:
                raise ConfigError(f"lora.{name} must be an integer in 1..4096, got {_brief(value)}")
        if not _number(self.alpha_per_rank) or not 0 < self.alpha_per_rank < 1e6:
            raise ConfigError(f"lora.alpha_per_rank must be a positive number, got {_brief(self.alpha_per_rank)}")
        if not _number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {_brief(self.dropout)}")
        if self.targets is not None:
            if not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t for t in self.targets):
                raise ConfigError(f"lora.targets must be a list of module names, got {_brief(self.targets)}")
            if not self.targets or len(self.targets) > 64:
                raise ConfigError("lora.targets must name 1 to 64 modules (or be left unset)")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _brief(value: object) -> str:
    """A short description of a bad value (it may be huge or deeply nested, from the wire)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40])
    return f"a {type(value).__name__}"


def block_ranks(num_layers: int, cuts: Iterable[int], settings: LoraSettings) -> dict[int, int]:
    """Rank per block: ``r_cut`` for blocks ``c - 1`` and ``c`` of every cut ``c``, ``r`` elsewhere."""
    ranks = dict.fromkeys(range(num_layers), settings.r)
    for cut in cuts:
        if not 1 <= cut <= num_layers - 1:
            raise ConfigError(f"cut layer must be in [1, {num_layers - 1}], got {cut}")
        ranks[cut - 1] = ranks[cut] = settings.r_cut
    return ranks


def peft_config(family: Family, ranks: Mapping[int, int], settings: LoraSettings) -> LoraConfig:
    """A PEFT ``LoraConfig`` giving block ``i`` the rank ``ranks[i]``."""
    if not ranks:
        raise ConfigError("a segment needs at least one block with LoRA")
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches a pattern key against the end of a module name: "transformer\.h\.3\..*"
    # matches "transformer.h.3.attn.c_attn" and nothing in block 13.
    prefix = re.escape(family.layers)
    rank_pattern = {rf"{prefix}\.{i}\..*": r for i, r in ranks.items() if r != default_r}
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=default_r,
        lora_alpha=settings.alpha_per_rank * default_r,  # type: ignore[arg-type]  # PEFT takes floats too
        rank_pattern=rank_pattern,
        alpha_pattern={k: settings.alpha_per_rank * r for k, r in rank_pattern.items()},
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets or family.lora_targets),
        fan_in_fan_out=family.fan_in_fan_out,
        bias="none",
    )


def state_name(param_name: str) -> str:
    """PEFT's saved name of a LoRA parameter (the adapter name dropped)."""
    return param_name.replace(f".{_ADAPTER}.", ".")


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters of ``model`` by saved name."""
    return {state_name(n): p for n, p in model.named_parameters() if ".lora_" in n}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the LoRA weights of ``model`` by saved name."""
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy ``state`` into the LoRA weights of ``model``.

    With ``strict`` every LoRA weight of the model must be given; extra names (blocks this model
    does not hold) are an error either way, as are shape mismatches.
    """
    params = lora_parameters(model)
    extra = sorted(set(state) - set(params))
    if extra:
        raise ConfigError(f"adapter state names weights this model does not hold: {extra[:3]}")
    if strict:
        missing = sorted(set(params) - set(state))
        if missing:
            raise ConfigError(f"adapter state lacks weights of this model: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ConfigError(f"{name}: shape {tuple(value.shape)} != the model's {tuple(p.shape)}")
            p.copy_(value)


def init_lora(model: nn.Module, seed: int) -> None:
    """Initialise every LoRA weight from ``seed`` and its name alone.

    A is drawn like PEFT's default (Kaiming-uniform, bound ``1/sqrt(fan_in)``), B is zero, so the
    adapted model starts equal to the base. Because each draw depends only on the seed and the
    weight's name, every segment of a job, built anywhere, starts with the same adapters.
    """
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if ".lora_B." in name:
                p.zero_()
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one warning PEFT causes: transformers 5 deprecates a name that PEFT still calls, and there is
    nothing for our users to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def block_of(name: str) -> int:
    """The block index in a LoRA weight's saved name (``...layers.7.self_attn...`` -> 7)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("h", "layers") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise ValueError(f"no block index in {name!r}")
