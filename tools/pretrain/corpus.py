"""The pretraining text (WikiText-2 articles, E2E references) and the tokenizer trained on it."""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

#: Bump when a change to this script changes what a given set of settings produces (invalidates caches).
from splitft.tools.pretrain.settings import E2E_TRAIN, EOS, PAD, WIKITEXT_TRAIN, WIKITEXT_VALID, Settings

# --------------------------------------------------------------------------- text


def read_text(path: Path, limit: int = 0) -> str:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    return text[:limit] if limit else text


_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)  # a WikiText article title; sections are " = = x = = "


def wikitext_articles(text: str) -> list[str]:
    """The articles of a WikiText file, in order, each stripped of surrounding blank lines."""
    starts = [m.start() for m in _HEADING.finditer(text)] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    pieces = [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [p for p in pieces if p]


def e2e_references(text: str) -> list[str]:
    """The reference texts of E2E lines ``meaning representation||reference``."""
    return [line.split("||", 1)[1].strip() for line in text.splitlines() if "||" in line]


def corpus(settings: Settings) -> tuple[list[str], list[str]]:
    """(training documents, validation documents), in a fixed order."""
    limit = settings.corpus_chars
    train = wikitext_articles(read_text(WIKITEXT_TRAIN, limit)) + e2e_references(read_text(E2E_TRAIN, limit))
    valid = wikitext_articles(read_text(WIKITEXT_VALID, limit))
    return train, valid


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ``documents`` (ids 0 and 1 are EOS and PAD)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )


def encode(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> torch.Tensor:
    """One stream of token ids (int64): each document followed by EOS."""
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)
