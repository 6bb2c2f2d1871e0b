"""Pretrain a small base model worth fine-tuning, from the text vendored in the package (nothing is
downloaded): a BPE tokenizer and a 12-block GPT-2- or LLaMA-style model (``DEMO``: the main job's 6 blocks),
cached by their settings.

The command and what it writes: :mod:`.cli` (``python scripts/pretrain_base.py --help``). Modules:
:mod:`.settings` (settings, data, cache), :mod:`.corpus` (text, tokenizer), :mod:`.train` (model,
training, the saved folder).
"""

from splitft.tools.pretrain.cli import bf16_is_fast, main, parse_args
from splitft.tools.pretrain.corpus import corpus, train_tokenizer
from splitft.tools.pretrain.settings import (
    DATA_FILES,
    DATASETS,
    DEFAULT_TOKENS,
    DEMO,
    EOS,
    FACTS_FILE,
    FAMILIES,
    PAD,
    Settings,
    cache_root,
    default_output,
    settings_hash,
)
from splitft.tools.pretrain.train import build_base, cached_facts, pretrain

__all__ = [
    "DATASETS", "DATA_FILES", "DEFAULT_TOKENS", "DEMO", "EOS", "FACTS_FILE", "FAMILIES", "PAD", "Settings", "bf16_is_fast",
    "build_base", "cache_root", "cached_facts", "corpus", "default_output", "main", "parse_args", "pretrain",
    "settings_hash", "train_tokenizer",
]  # fmt: skip
