"""The study's settings (the quick and the full variant), its fleet and methods, and its JSONL files."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitft.shared.job.config import OptimizerSettings
from splitft.shared.profiles import server_rates

TASKS = ("gsm8k", "wikitext", "e2e")  # splitft.bench.study.tasks

FLEET = ("jetson-nano", "jetson-orin-nano", "jetson-orin-nano", "raspberry-pi-5", "laptop")
METHODS = ("centralised", "fedavg", "fixed", "paper", "splitft")
SPLIT_METHODS = ("fixed", "paper", "splitft")
WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class StudySettings:
    """One study: the budget every method gets, and how it is measured."""

    variant: str
    alphas: tuple[float, ...] = (0.1, 1.0)
    rounds: int = 12
    local_steps: int = 4
    batch_size: int = 4  # sequences per device per step
    max_length: int = 256  # the base's positions (GSM8K's median is 187 tokens, 20% are truncated)
    samples_per_agent: int = 120  # GSM8K train problems per device on average (the partition is uneven)
    lr: float = 3e-3
    r: int = 16
    r_cut: int = 8  # splitft's rank at the cut blocks; the other methods use r everywhere
    fixed_cut: int = 2  # the fixed method's cut, and everyone's first-round cut
    eval_samples: int = 64  # GSM8K test problems evaluated every round (perplexity against time)
    final_eval_samples: int = 200  # for the final perplexity and next-token accuracy
    gen_samples: int = 50  # GSM8K test problems answered by greedy generation
    gen_tokens: int = 128
    # The published tiny studies' server: this host's measured speed x server_speedup (before servers were named;
    # kept to read their results). New runs ignore it: their server is `server`.
    server_speedup: float = 100.0
    server: str = "gpu-l4"  # the simulated server: a profile name or "blocks,head" TFLOP/s (host-independent)
    task: str = "gsm8k"  # splitft.bench.study.tasks.TASKS
    split: str = "two-part"  # the split runs' split, "two-part" or "u" (their devices then also hold `tail` blocks)
    tail: int = 1
    wire_alpha: float = 1.0
    target_margin: float = 0.05  # target perplexity: centralised's final x (1 + margin)
    seed: int = 0
    base_tokens: int = 0  # pretraining token budget (0: splitft.tools.pretrain's default)
    methods: tuple[str, ...] = METHODS
    wire_dtypes: tuple[str, ...] = WIRE_DTYPES  # splitft reruns at wire_alpha (fp16 is its main run)

    def __post_init__(self) -> None:
        if "centralised" not in self.methods or not set(self.methods) <= set(METHODS):
            raise ValueError(f"methods must be among {METHODS} and include centralised (the target's reference)")
        if not set(self.wire_dtypes) <= set(WIRE_DTYPES):
            raise ValueError(f"wire dtypes must be among {WIRE_DTYPES}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.split not in ("two-part", "u"):
            raise ValueError(f"split must be two-part or u, got {self.split!r}")
        server_rates(self.server)  # a ConfigError (a ValueError) naming what is wrong
        if self.wire_alpha not in self.alphas:
            raise ValueError(f"wire_alpha {self.wire_alpha} is not one of the alphas {self.alphas}")

    @property
    def optimizer(self) -> OptimizerSettings:
        return OptimizerSettings("adamw", self.lr)

    @property
    def agents(self) -> int:
        return len(FLEET)


QUICK = StudySettings(
    variant="quick",
    rounds=5,
    local_steps=2,
    batch_size=2,
    samples_per_agent=40,
    eval_samples=16,
    final_eval_samples=48,
    gen_samples=8,
    gen_tokens=64,
    base_tokens=300_000,
)
FULL = StudySettings(variant="full")
# A real model (SmolLM2-135M on 2 cores: seconds for a batch's forward and backward, where the tiny base takes a
# tenth of one): the quick variant keeps to 40 minutes (fewer rounds, fp16 and int8 on the wire only), the full
# one to 2.5 hours.
QUICK_MODEL = dataclasses.replace(
    QUICK, rounds=5, wire_dtypes=("fp16", "int8"), final_eval_samples=48, gen_samples=48, base_tokens=0
)


def model_settings(quick: bool, task: str) -> StudySettings:
    """A real model's variant for ``task``: WikiText-2's paragraphs are long, so its quick variant reads them in
    pieces of 128 tokens (E2E's pairs are about 90 tokens, GSM8K's problems need 256). GSM8K's full variant lets
    the model write 256 new tokens, as the main job does: a worked answer rarely reaches its ``#### N`` in 96."""
    if not quick:
        return dataclasses.replace(FULL_MODEL, gen_tokens=256) if task == "gsm8k" else FULL_MODEL
    return dataclasses.replace(QUICK_MODEL, max_length=128) if task == "wikitext" else QUICK_MODEL


FULL_MODEL = dataclasses.replace(
    FULL, rounds=8, local_steps=2, batch_size=2, samples_per_agent=60, eval_samples=32, final_eval_samples=64,
    gen_samples=32, gen_tokens=96, wire_dtypes=("fp16", "int8"),
)  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
