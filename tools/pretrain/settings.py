"""What a pretraining run is: its settings, the vendored data it reads, and where its result is cached."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitft.shared.model.tokenizer import DATASETS

#: Bump when a change to this script changes what a given set of settings produces (invalidates caches).


FORMAT_VERSION = 1
EOS = "<|endoftext|>"
PAD = "<|pad|>"
FACTS_FILE = "pretrain.json"
FAMILIES = ("gpt2", "llama")
PRECISIONS = ("fp32", "bf16")

#: The vendored text: training (WikiText-2 test split, E2E references) and validation (WikiText-2 valid).
WIKITEXT_TRAIN = DATASETS / "wikitext-2" / "test.txt.gz"
WIKITEXT_VALID = DATASETS / "wikitext-2" / "valid.txt.gz"
E2E_TRAIN = DATASETS / "e2e" / "valid.txt.gz"
DATA_FILES = (WIKITEXT_TRAIN, E2E_TRAIN, WIKITEXT_VALID)

#: Default token budgets by (family, precision): about 11 minutes of training (12 with tokenizer,
#: validation and saving) per family with the default shape on 2 free cores of an AMD EPYC (Zen 4, AVX-512
#: BF16), measured at about 2,100 tokens/s for either family with bf16 autocast and 1,320 (gpt2) / 1,490
#: (llama) in fp32; pretrain.json records each run's speed. Both families together: about 25 minutes.
DEFAULT_TOKENS = {
    ("gpt2", "bf16"): 1_400_000,
    ("llama", "bf16"): 1_400_000,
    ("gpt2", "fp32"): 900_000,
    ("llama", "fp32"): 1_000_000,
}

Log = Callable[[str], None]
Progress = Callable[[int, int | None], None]  # (steps done, steps planned or None)


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights (the cache key hashes all of it plus the data)."""

    family: str = "gpt2"
    vocab_size: int = 8192
    layers: int = 12
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2  # llama only: grouped-query attention, as in the tiny-llama preset
    intermediate: int = 0  # MLP width; 0: 4 * hidden (gpt2), 688 ~ 8/3 * hidden rounded to 16 (llama)
    seq_len: int = 256  # training window; also the model's position limit (GPT-2's learned positions)
    batch_size: int = 8
    tokens: int = 0  # token budget; 0: DEFAULT_TOKENS[family, precision] (ignored when steps or minutes is set)
    steps: int = 0  # optimizer steps; overrides tokens
    minutes: float = 0.0  # size the run to this wall-clock budget instead (machine-dependent)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    dropout: float = 0.0  # while pretraining (a few epochs: none needed); the saved config has none
    grad_clip: float = 1.0
    precision: str = "fp32"  # or "bf16": bf16 autocast (fp32 weights and optimizer); the CLI picks bf16 where fast
    seed: int = 0
    corpus_chars: int = 0  # use only the first N characters of each text (tests); 0: all
    eval_every: int = 0  # steps between validations; 0: five per run
    eval_tokens: int = 16_384  # validation tokens per periodic check (in the training precision)
    final_eval_tokens: int = 65_536  # validation tokens of the final check (fp32); 0: all (~287k, slow on a CPU)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden % self.heads or (self.family == "llama" and self.heads % self.kv_heads):
            raise ValueError("hidden must divide by heads (and heads by kv_heads for llama)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if min(self.vocab_size - 258, self.layers, self.seq_len - 1, self.batch_size) < 1:
            raise ValueError("vocab_size > 258 (bytes + special tokens), layers, batch_size >= 1, seq_len >= 2")

    @property
    def mlp_width(self) -> int:
        if self.intermediate:
            return self.intermediate
        return 4 * self.hidden if self.family == "gpt2" else 16 * round(8 * self.hidden / 3 / 16)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def planned_steps(self) -> int | None:
        """Steps the run will take, or None when ``minutes`` decides it during the run."""
        if self.steps:
            return self.steps
        if self.minutes:
            return None
        return max(1, (self.tokens or DEFAULT_TOKENS[self.family, self.precision]) // self.tokens_per_step)

    def key(self) -> dict[str, Any]:
        """The settings that decide the result, budget resolved (tokens, steps or minutes: whichever rules)."""
        key = dataclasses.asdict(self)
        planned = self.planned_steps()
        key["tokens"] = key["steps"] = key["minutes"] = None
        if planned is None:
            key["minutes"] = self.minutes
        else:
            key["steps"] = planned
        key["intermediate"] = self.mlp_width
        if self.family == "gpt2":
            key["kv_heads"] = None
        return key


def data_digest() -> dict[str, str]:
    """SHA-256 of each vendored file the run reads, by name."""
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in DATA_FILES}


def settings_hash(settings: Settings) -> str:
    payload = {"format": FORMAT_VERSION, "settings": settings.key(), "data": data_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_root() -> Path:
    """``$SPLITFT_CACHE`` or ``~/.cache/splitft``."""
    env = os.environ.get("SPLITFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitft"


def default_output(settings: Settings) -> Path:
    return cache_root() / "base" / f"{settings.family}-{settings_hash(settings)[:12]}"


#: The main job's base (``scripts/demo.sh``, ``--demo``): 6 blocks of width 128 on the same text, so that a
#: fresh clone fine-tunes a model that has read English within the demo's few minutes (see README). 400k
#: tokens, about one epoch: 82 s in all on 2 cores of an AMD EPYC (5,600 tokens/s in bf16), WikiText-2
#: validation perplexity 305 (the 12-block default: 193).
DEMO = Settings(
    layers=6,
    hidden=128,
    heads=4,
    tokens=400_000,
    warmup_steps=20,
    lr=2e-3,
    eval_tokens=8_192,
    final_eval_tokens=16_384,
)
