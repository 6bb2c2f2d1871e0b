"""Job configuration: frozen dataclasses, read from TOML at the command-line edge.

A job file looks like::

    job = "gsm8k-demo"
    model = "tiny-gpt2"          # a preset, a Hugging Face folder or a .gguf file
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

:func:`broker_settings` builds the broker connection of both commands from their options (TLS files,
the message authentication key file), naming the option that is wrong.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import check_chat_template
from splitft.shared.model.defense import PRIVACY_LEVELS, DefenseSettings
from splitft.shared.model.loading import ATTENTION_IMPLEMENTATIONS
from splitft.shared.model.lora import LoraSettings
from splitft.shared.model.precision import torch_dtype
from splitft.shared.profiles import server_rates
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES
from splitft.shared.wire.topics import check_name

OPTIMIZERS = ("adamw", "sgd")
#: cut-layer policies of the controller (coordinator/controller.py)
POLICIES = ("fixed", "paper", "latency", "splitft")
#: how the model is split: the device holds the first blocks ("two-part": the server computes the loss, so
#: it receives the labels), or both ends ("u": the last blocks and the head too; no token leaves the device)
SPLITS = ("two-part", "u")


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
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
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
    min_agents: int = 1  # a round starts with this many agents online, and counts only if this many finish it
    join_timeout_s: float = 300.0  # how long to wait for min_agents before giving up
    join_window_s: float = 2.0  # once min_agents are in, how long more agents may still join the first round
    step_timeout_s: float = 300.0  # an agent that sends no activations within this is dropped from the round
    # Once the controller predicts step times, a step's deadline is deadline_factor x the predicted step,
    # at least min_step_timeout_s and at most step_timeout_s.
    deadline_factor: float = 4.0
    min_step_timeout_s: float = 10.0
    offline_grace_s: float = 5.0  # an agent whose Last Will came is dropped unless it is back within this
    upload_timeout_s: float = 300.0  # likewise for the adapter upload at the end of a round
    cut: int = 2  # cut layer of agents not named in `cuts` (and every agent's first round)
    cuts: Mapping[str, int] = field(default_factory=dict)
    split: str = "two-part"  # "two-part" or "u" (U-shaped: the device also holds the last `tail` blocks and the head)
    # U split: blocks at the top of the model that agents not named in `tails` hold (0 = the norm and head only).
    # 0 by default: the privacy audit finds deeper tails do not keep the labels from the returned gradient.
    tail: int = 0
    tails: Mapping[str, int] = field(default_factory=dict)
    k_min: int = 0  # U split: the fewest tail blocks the controller may give a device ...
    k_max: int | None = None  # ... and the most (default: as many as leave the server one block)
    report_loss: bool = True  # U split: agents report their mean training loss (one number per step)
    policy: str = "fixed"  # how cuts change between rounds: fixed, paper, latency, splitft
    c_min: int = 1  # the shallowest cut allowed (a privacy floor as well as a bound)
    c_max: int | None = None  # the deepest (default: num_layers - 1)
    gamma: float = 1.0  # weight of the accuracy term (paper, splitft)
    hysteresis: float = 0.1  # splitft: new cuts must be predicted this much faster to replace the old
    # latency, splitft: plan round 1 from the agents' join measurements (false: the configured cuts first)
    plan_first_round: bool = True
    ewma: float = 0.3  # weight of the newest measurement in the latency estimates
    wire_dtype: str = "fp16"  # activations and gradients
    adapter_wire_dtype: str = "fp32"  # adapters are small: keep them exact
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    defense: DefenseSettings = field(default_factory=DefenseSettings)  # what devices do to their activations
    # "off", "balanced" or "strict": a measured setting (defense.PRIVACY_LEVELS); sets `defense` (then left out,
    # or equal to the level's) and turns `private_adapters` on where the level has them
    privacy: str = "off"
    # The adapters of blocks 0..c_min-1 leave a device only sealed with the fleet key, and the devices average them
    # (shared/wire/sealed.py): the coordinator never holds them in clear. Agents join with --fleet-key-file.
    private_adapters: bool = False
    attn_implementation: str = "sdpa"
    # The server segment's frozen base weights: fp32, bf16 (a GPU host; autocast on CUDA) or fp16. Each device
    # picks its own (`splitft-agent join --dtype`, by default its profile's). Adapters are fp32 everywhere.
    base_dtype: str = "fp32"
    # Pairs and conversations through the tokenizer's chat template: "auto" (when it has one), true, false
    chat_template: str | bool = "auto"
    seed: int = 0  # adapter initialisation and data order
    eval_data: str | None = (
        None  # JSONL/CSV/Parquet records (shared/job/records.py); default: the vendored GSM8K test split
    )
    eval_samples: int = 64  # evaluation problems per round (the first ones of eval_data)
    eval_batch_size: int = 8
    # An adapter upload whose change from the round's start is this many times the median change of the
    # round's uploads is refused from the aggregate (0 turns the check off; needs 3 uploads or more).
    max_update_ratio: float = 10.0
    # The controller plans as if the server were this many times faster than it measures: an emulated
    # study's stand-in for a GPU server (this host's measured speed x server_speedup). Real jobs keep 1.
    server_speedup: float = 1.0
    # Or: the controller plans as if the server were this one, a profile name (firmware_profiles/, e.g. gpu-l4) or
    # "blocks,head" in TFLOP/s, instead of measuring this host; with agents emulated virtually, the cuts then
    # depend on nothing of the machine the job runs on (studies; splitft.bench.clock replays with the same rates).
    emulate_server: str | None = None
    # Two-part: merge the step's activations of every device into as few server passes as fit (for a GPU
    # host with many devices); the server then waits for the step's last device before it answers any.
    server_batching: bool = False
    # one merged pass: rows x padded length at most (more: another pass); 4096 is the best measured on a CPU
    # (BENCHMARKS.md, "The batched server segment"); a GPU takes more
    server_max_batch_tokens: int = 4096

    def __post_init__(self) -> None:
        check_name("job", self.job)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a preset name or a model folder, got {self.model!r}")
        positive = ("rounds", "local_steps", "batch_size", "min_agents", "eval_samples", "eval_batch_size", "cut")
        for name in positive:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if type(self.max_length) is not int or self.max_length < 8:
            raise ConfigError(f"max_length must be an integer >= 8, got {self.max_length!r}")
        if not (_is_number(self.join_window_s) and 0 <= self.join_window_s < 1e6):
            raise ConfigError(f"join_window_s must be a number of seconds >= 0, got {self.join_window_s!r}")
        for name in ("join_timeout_s", "step_timeout_s", "upload_timeout_s"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.cuts, Mapping):
            raise ConfigError(f"cuts must map agent names to cut layers, got {self.cuts!r}")
        for agent, cut in self.cuts.items():
            check_name("agent", agent)
            if type(cut) is not int or cut < 1:
                raise ConfigError(f"cuts.{agent} must be a positive integer, got {cut!r}")
        for name in ("wire_dtype", "adapter_wire_dtype"):
            if getattr(self, name) not in FLOAT_WIRE_DTYPES:
                raise ConfigError(f"{name} must be one of {list(FLOAT_WIRE_DTYPES)}, got {getattr(self, name)!r}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got {self.attn_implementation!r}"
            )
        check_chat_template(self.chat_template)
        torch_dtype(self.base_dtype)
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if not isinstance(self.tails, Mapping):
            raise ConfigError(f"tails must map agent names to tail depths, got {self.tails!r}")
        for agent, tail in [("tail", self.tail), *((f"tails.{a}", t) for a, t in self.tails.items())]:
            if type(tail) is not int or tail < 0:
                raise ConfigError(f"{agent} must be an integer >= 0, got {tail!r}")
        for agent in self.tails:
            check_name("agent", agent)
        if type(self.k_min) is not int or self.k_min < 0:
            raise ConfigError(f"k_min must be an integer >= 0, got {self.k_min!r}")
        if self.split == "u":
            for agent, tail in [("tail", self.tail), *((f"tails.{a}", t) for a, t in self.tails.items())]:
                if tail < self.k_min or (self.k_max is not None and tail > self.k_max):
                    raise ConfigError(f"{agent} = {tail} is outside k_min..k_max ({self.k_min}..{self.k_max or 'L'})")
        if self.k_max is not None and (type(self.k_max) is not int or self.k_max < self.k_min):
            raise ConfigError(f"k_max must be an integer >= k_min ({self.k_min}), got {self.k_max!r}")
        if type(self.server_max_batch_tokens) is not int or self.server_max_batch_tokens < 1:
            raise ConfigError(
                f"server_max_batch_tokens must be a positive integer, got {self.server_max_batch_tokens!r}"
            )
        for flag in ("report_loss", "plan_first_round", "server_batching"):
            if type(getattr(self, flag)) is not bool:
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if type(self.c_min) is not int or self.c_min < 1:
            raise ConfigError(f"c_min must be a positive integer, got {self.c_min!r}")
        if self.c_max is not None and (type(self.c_max) is not int or self.c_max < self.c_min):
            raise ConfigError(f"c_max must be an integer >= c_min ({self.c_min}), got {self.c_max!r}")
        for name in ("gamma", "hysteresis"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (_is_number(self.server_speedup) and 0 < self.server_speedup < 1e6):
            raise ConfigError(f"server_speedup must be a positive number, got {self.server_speedup!r}")
        if self.emulate_server is not None:
            server_rates(self.emulate_server)  # a ConfigError naming what is wrong
            if self.server_speedup != 1:
                raise ConfigError("emulate_server and server_speedup are two ways to set the server's speed: give one")
        if not (_is_number(self.ewma) and 0 < self.ewma <= 1):
            raise ConfigError(f"ewma must be a number in (0, 1], got {self.ewma!r}")
        if type(self.seed) is not int:
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.eval_data is not None and (not isinstance(self.eval_data, (str, Path)) or not str(self.eval_data)):
            raise ConfigError(f"eval_data must be the path of a JSONL/CSV file, got {self.eval_data!r}")
        if not isinstance(self.lora, LoraSettings):
            raise ConfigError(f"lora must be LoRA settings (a [lora] table), got {self.lora!r}")
        if not isinstance(self.optimizer, OptimizerSettings):
            raise ConfigError(f"optimizer must be optimiser settings (an [optimizer] table), got {self.optimizer!r}")
        if not isinstance(self.defense, DefenseSettings):
            raise ConfigError(f"defense must be defense settings (a [defense] table), got {self.defense!r}")
        if type(self.private_adapters) is not bool:
            raise ConfigError(f"private_adapters must be true or false, got {self.private_adapters!r}")
        low = [f"{agent} {cut}" for agent, cut in [("(default)", self.cut), *self.cuts.items()] if cut < self.c_min]
        if self.private_adapters and low:
            raise ConfigError(
                f"private_adapters keeps blocks 0..c_min-1 ({self.c_min}) on every device, but these cuts are below "
                f"c_min: {', '.join(low)}"
            )
        if self.privacy not in PRIVACY_LEVELS:
            raise ConfigError(f"privacy must be one of {sorted(PRIVACY_LEVELS)}, got {self.privacy!r}")
        if self.privacy != "off":
            level = PRIVACY_LEVELS[self.privacy]
            if self.defense not in (DefenseSettings(), level.defense):
                raise ConfigError(
                    f'privacy = "{self.privacy}" sets the defense ({level.defense.describe()}): leave [defense] out'
                )
            object.__setattr__(self, "defense", level.defense)
            if level.private_adapters:
                object.__setattr__(self, "private_adapters", True)

    @property
    def u_split(self) -> bool:
        return self.split == "u"

    def cut_of(self, agent: str) -> int:
        return self.cuts.get(agent, self.cut)

    def tail_of(self, agent: str) -> int:
        """The tail depth k of ``agent`` in the first round (0 in the two-part split: the server holds the top)."""
        return self.tails.get(agent, self.tail) if self.u_split else 0

    def check_cuts(self, num_layers: int) -> None:
        """Cuts must leave at least one block on each side; so must the controller's bounds c_min, c_max.

        In the U split the server keeps at least one block between a device's cut and its tail.
        """
        for agent, cut in [("(default)", self.cut), *self.cuts.items()]:
            if not 1 <= cut <= num_layers - 1:
                raise ConfigError(f"cut of {agent} is {cut}, but the model's cut layers are 1..{num_layers - 1}")
        for name in ("c_min", "c_max"):
            value = getattr(self, name)
            if value is not None and value > num_layers - 1:
                raise ConfigError(f"{name} is {value}, but the model's cut layers are 1..{num_layers - 1}")
        if not self.u_split:
            return
        names = sorted({"(default)", *self.cuts, *self.tails})
        for agent in names:
            cut = self.cut if agent == "(default)" else self.cut_of(agent)
            tail = self.tail if agent == "(default)" else self.tail_of(agent)
            if cut + tail > num_layers - 1:
                raise ConfigError(
                    f"{agent}: cut {cut} + tail {tail} leaves the server no block of the model's {num_layers}"
                )
        if self.c_min + self.k_min > num_layers - 1:
            raise ConfigError(f"c_min {self.c_min} + k_min {self.k_min} leaves the server no block of {num_layers}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobConfig:
        """Build from a parsed TOML table; unknown keys are an error (a typo must not pass silently)."""
        data = dict(data)
        nested: dict[str, Any] = {}
        for key, kind in (("lora", LoraSettings), ("optimizer", OptimizerSettings), ("defense", DefenseSettings)):
            if key in data:
                table = data.pop(key)
                if not isinstance(table, dict):
                    raise ConfigError(f"[{key}] must be a table, got {table!r}")
                _check_keys(kind, table, key + ".")
                if key == "lora":
                    table = _lora_table(table)
                try:
                    nested[key] = kind(**table)
                except TypeError as exc:  # a value of the wrong type that the class compares before checking
                    raise ConfigError(f"bad [{key}] table: {exc}") from exc
        for table in ("cuts", "tails"):
            if table in data and not isinstance(data[table], dict):
                raise ConfigError(f"[{table}] must be a table of agent = {table[:-1]}")
        _check_keys(cls, data, "")
        try:
            return cls(**data, **nested)
        except TypeError as exc:
            raise ConfigError(f"bad job configuration: {exc}") from exc

    @classmethod
    def from_toml(cls, path: str | Path) -> JobConfig:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"job file {path} is a folder, not a TOML file")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"job file {path} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"job file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"job file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def with_overrides(self, **changes: Any) -> JobConfig:
        """A copy with the given fields replaced (None values are ignored: flags the user did not give)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _is_number(value: Any) -> bool:
    """An int or a float, but not a bool (TOML's ``true`` must not pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lora_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """Check the types of a [lora] table (LoraSettings compares before it checks) and make targets a tuple."""
    table = dict(table)
    for key in ("r", "r_cut"):
        if key in table and type(table[key]) is not int:
            raise ConfigError(f"lora.{key} must be a positive integer, got {table[key]!r}")
    for key in ("alpha_per_rank", "dropout"):
        if key in table and not (_is_number(table[key]) and math.isfinite(table[key])):
            raise ConfigError(f"lora.{key} must be a number, got {table[key]!r}")
    if "targets" in table:
        targets = table["targets"]
        if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"lora.targets must be a list of module names, got {targets!r}")
        table["targets"] = tuple(targets)
    return table


def torch_device(device: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; ``cpu`` and ``cuda[:N]`` as given, where this machine has that CUDA device
    (an error now, not when the first round starts)."""
    from splitft.shared.model.loading import resolve_device

    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        index = resolved.partition(":")[2]
        if resolved != "cuda" and not index.isdigit():
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        if not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has no such CUDA device")
    return resolved


def _check_keys(kind: type, table: Mapping[str, Any], prefix: str) -> None:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(known))}"
        )
