"""Job configuration: frozen dataclasses, read from TOML at the command-line edge.

A job file looks like::

    job = "gsm8k-demo"
    model = "tiny-gpt2"
    rounds = 5
    local_steps = 4
    min_agents = 3
    cut = 2                      # the cut of agents not named below
    wire_dtype = "fp16"

    [cuts]                       # per-agent cut layers
    jetson-1 = 1
    laptop = 4

    [lora]
    r = 16
    r_cut = 8

    [optimizer]
    name = "adamw"
    lr = 1e-3

Every value is checked when the object is made; the error names the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib
import torch

from .codec import FLOAT_WIRE_DTYPES
from .errors import ConfigError
from .lora import LoraSettings
from .models import ATTENTION_IMPLEMENTATIONS
from .topics import check_name

OPTIMIZERS = ("adamw", "sgd")
#: cut-layer policies of the controller (coordinator/controller.py)
POLICIES = ("fixed", "paper", "latency", "splitft")


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser of every LoRA weight, on the devices and on the server."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {self.name!r}")
        for name in ("lr", "weight_decay", "momentum"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"optimizer.{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ConfigError("optimizer.lr must be positive")

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class JobConfig:
    """One federated split fine-tuning job, as the coordinator runs it."""

    job: str = "splitft"
    model: str = "tiny-gpt2"  # preset name or local model folder (agents must use the same)
    rounds: int = 5
    local_steps: int = 4  # training steps per agent per round between aggregations
    batch_size: int = 4  # sequences per step per agent
    max_length: int = 256  # tokens per sequence, at most
    min_agents: int = 1  # a round starts only with this many agents online
    join_timeout_s: float = 300.0  # how long to wait for min_agents before giving up
    join_window_s: float = 2.0  # once min_agents are in, how long more agents may still join the first round
    step_timeout_s: float = 300.0  # an agent that sends no activations within this is dropped from the round
    upload_timeout_s: float = 300.0  # likewise for the adapter upload at the end of a round
    cut: int = 2  # cut layer of agents not named in `cuts` (and every agent's first round)
    cuts: Mapping[str, int] = field(default_factory=dict)
    policy: str = "fixed"  # how cuts change between rounds: fixed, paper, latency, splitft
    c_min: int = 1  # the shallowest cut allowed (a privacy floor as well as a bound)
    c_max: int | None = None  # the deepest (default: num_layers - 1)
    gamma: float = 1.0  # weight of the accuracy term (paper, splitft)
    hysteresis: float = 0.1  # splitft: new cuts must be predicted this much faster to replace the old
    ewma: float = 0.3  # weight of the newest measurement in the latency estimates
    wire_dtype: str = "fp16"  # activations and gradients
    adapter_wire_dtype: str = "fp32"  # adapters are small: keep them exact
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    attn_implementation: str = "sdpa"
    seed: int = 0  # adapter initialisation and data order
    eval_data: str | None = None  # JSONL/CSV of prompt/response pairs; default: the vendored GSM8K test split
    eval_samples: int = 64  # evaluation problems per round (the first ones of eval_data)
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        check_name("job", self.job)
        positive = ("rounds", "local_steps", "batch_size", "min_agents", "eval_samples", "eval_batch_size", "cut")
        for name in positive:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if type(self.max_length) is not int or self.max_length < 8:
            raise ConfigError(f"max_length must be an integer >= 8, got {self.max_length!r}")
        if not (isinstance(self.join_window_s, (int, float)) and 0 <= self.join_window_s < 1e6):
            raise ConfigError(f"join_window_s must be a number of seconds >= 0, got {self.join_window_s!r}")
        for name in ("join_timeout_s", "step_timeout_s", "upload_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for agent, cut in self.cuts.items():
            check_name("agent", agent)
            if type(cut) is not int or cut < 1:
                raise ConfigError(f"cuts.{agent} must be a positive integer, got {cut!r}")
        for name in ("wire_dtype", "adapter_wire_dtype"):
            if getattr(self, name) not in FLOAT_WIRE_DTYPES:
                raise ConfigError(f"{name} must be one of {list(FLOAT_WIRE_DTYPES)}, got {getattr(self, name)!r}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation must be one of {list(ATTENTION_IMPLEMENTATIONS)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if type(self.c_min) is not int or self.c_min < 1 or (self.c_max is not None and self.c_max < self.c_min):
            raise ConfigError(f"need 1 <= c_min <= c_max, got c_min={self.c_min!r}, c_max={self.c_max!r}")
        if not 0 < self.ewma <= 1:
            raise ConfigError(f"ewma must be in (0, 1], got {self.ewma!r}")
        if type(self.seed) is not int:
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def cut_of(self, agent: str) -> int:
        return self.cuts.get(agent, self.cut)

    def check_cuts(self, num_layers: int) -> None:
        """Cuts must leave at least one block on each side."""
        for agent, cut in [("(default)", self.cut), *self.cuts.items()]:
            if not 1 <= cut <= num_layers - 1:
                raise ConfigError(f"cut of {agent} is {cut}, but the model's cut layers are 1..{num_layers - 1}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobConfig:
        """Build from a parsed TOML table; unknown keys are an error (a typo must not pass silently)."""
        data = dict(data)
        nested: dict[str, Any] = {}
        for key, kind in (("lora", LoraSettings), ("optimizer", OptimizerSettings)):
            if key in data:
                table = data.pop(key)
                if not isinstance(table, dict):
                    raise ConfigError(f"[{key}] must be a table")
                _check_keys(kind, table, key + ".")
                if key == "lora" and "targets" in table:
                    table = {**table, "targets": tuple(table["targets"])}
                nested[key] = kind(**table)
        if "cuts" in data and not isinstance(data["cuts"], dict):
            raise ConfigError("[cuts] must be a table of agent = cut")
        _check_keys(cls, data, "")
        try:
            return cls(**data, **nested)
        except TypeError as exc:
            raise ConfigError(f"bad job configuration: {exc}") from exc

    @classmethod
    def from_toml(cls, path: str | Path) -> JobConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"job file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read job file {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def with_overrides(self, **changes: Any) -> JobConfig:
        """A copy with the given fields replaced (None values are ignored: flags the user did not give)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _check_keys(kind: type, table: Mapping[str, Any], prefix: str) -> None:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(known))}"
        )
