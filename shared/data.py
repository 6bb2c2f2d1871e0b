"""The training data of one device (or the coordinator's eval set): records, tokens, batches, shards.

A data file is JSONL (``.jsonl``/``.json``, one object a line) or CSV with a header; each record is a
(prompt, response) pair. Tokenized examples carry labels that are ``IGNORE_INDEX`` on the prompt, so
the loss is taken on the response and its EOS only. :class:`Batches` is endless and deterministic from
a seed, and its position can be saved and restored so that a resumed run sees the same batches.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedTokenizerBase

from .errors import ConfigError, DataError
from .split import IGNORE_INDEX

FIELD_PAIRS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))
JSONL_SUFFIXES = (".jsonl", ".json")


def _jsonl_rows(path: Path, f: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    first = True
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            raise DataError(
                f"{path}: holds a JSON array; SplitFT reads one JSON object per line (JSONL): convert it with "
                f"`jq -c '.[]' {path} > data.jsonl`"
            )
        first = False
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
        yield lineno, record


def _pick_fields(names: Collection[str], where: str) -> tuple[str, str]:
    for pair in FIELD_PAIRS:
        if pair[0] in names and pair[1] in names:
            return pair
    known = ", ".join(f"{p}/{r}" for p, r in FIELD_PAIRS)
    raise DataError(
        f"{where}: none of the field pairs {known} in {sorted(names)}; name the fields with --prompt-field and "
        "--response-field (splitft-agent join, splitft-coordinator local)"
    )


def _csv_rows(
    path: Path, f: TextIO, fields: tuple[str, str] | None
) -> tuple[tuple[str, str], Iterator[tuple[int, dict[str, Any]]]]:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header:
        raise DataError(f"{path}: the CSV file has no header")
    fields = fields or _pick_fields(header, f"{path}:1 (CSV header)")
    missing = [name for name in fields if name not in header]
    if missing:
        raise DataError(f"{path}:1: the CSV header lacks field(s) {', '.join(map(repr, missing))}")
    # A short row leaves its last fields None: they count as missing, as in JSON.
    rows = ((reader.line_num, {k: v for k, v in row.items() if v is not None}) for row in reader)
    return fields, rows


def load_records(
    path: str | Path, prompt_field: str | None = None, response_field: str | None = None, limit: int | None = None
) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL or CSV file (by suffix: ``.jsonl``/``.json`` lines, ``.csv`` with a header).

    The fields are those given, or the first pair of :data:`FIELD_PAIRS` present in the first record
    (the header of a CSV file). Empty JSONL lines are skipped; at most ``limit`` records are read.
    """
    path = Path(path)
    if (prompt_field is None) != (response_field is None):
        raise ConfigError("prompt_field and response_field must be given together")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    is_csv = path.suffix.lower() == ".csv"
    if not is_csv and path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"{path}: unknown data file suffix {path.suffix!r}; expected .jsonl, .json or .csv")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    fields = None if prompt_field is None or response_field is None else (prompt_field, response_field)
    pairs: list[tuple[str, str]] = []
    try:
        with path.open(encoding="utf-8", newline="" if is_csv else None) as f:
            if is_csv:
                fields, rows = _csv_rows(path, f, fields)
            else:
                rows = _jsonl_rows(path, f)
            for lineno, record in rows:
                fields = fields or _pick_fields(record, f"{path}:{lineno}")
                missing = [name for name in fields if name not in record]
                if missing:
                    raise DataError(f"{path}:{lineno}: record lacks field(s) {', '.join(map(repr, missing))}")
                for name in fields:
                    if not isinstance(record[name], str):
                        raise DataError(
                            f"{path}:{lineno}: field {name!r} must be a string, got {type(record[name]).__name__}"
                        )
                pairs.append((record[fields[0]], record[fields[1]]))
                if limit is not None and len(pairs) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not pairs:
        raise DataError(f"{path}: no usable records")
    return pairs


@dataclass(frozen=True)
class Example:
    """One tokenized (prompt, response) pair."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on the prompt tokens: the loss is taken on the response (and EOS) only


def tokenize(pairs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Examples ``tokens(prompt + "\\n") + tokens(response) + [eos]``, truncated to ``max_length``.

    Examples with no response token left after truncation (not even the EOS) are dropped.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ConfigError("the tokenizer has no EOS token")
    if not pairs:
        return []
    # One batched call each: the fast tokenizer works on the whole list in Rust.
    prompts = tokenizer([p + "\n" for p, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    examples = []
    for prompt, response in zip(prompts, responses, strict=True):
        ids = (list(prompt) + list(response) + [eos])[:max_length]
        if len(ids) <= len(prompt):
            continue
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        examples.append(Example(tuple(ids), tuple(labels)))
    return examples


def eval_examples(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int, limit: int | None = None
) -> list[Example]:
    """The evaluation examples of a data file: the first ``limit`` records that fit ``max_length``. None fitting
    is a DataError (an evaluation on nothing would report a perplexity of 1)."""
    pairs = load_records(source, limit=limit)
    examples = tokenize(pairs, tokenizer, max_length)
    if not examples:
        raise DataError(
            f"{source}: none of the {len(pairs)} evaluation examples read fits max_length {max_length} (each needs "
            "its prompt and at least one response token): use shorter prompts or a larger max_length"
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids (B, T), labels (B, T), lengths (B,))``, all int64; ``T`` is the longest example.

    Labels are ``IGNORE_INDEX`` on the padding.
    """
    if not examples:
        raise ConfigError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids, dtype=torch.int64)
        labels[row, : len(example.labels)] = torch.tensor(example.labels, dtype=torch.int64)
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    return input_ids, labels, lengths


class Batches:
    """Deterministic, endless batches of ``batch_size`` examples.

    Epoch ``e`` visits the examples in the permutation drawn by a ``torch.Generator`` seeded with
    ``seed + e``; the last partial batch of an epoch is completed from the next one, so every batch is full.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int = 0) -> None:
        if not examples:
            raise ConfigError("examples must not be empty")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)
        # Position 0 is never a target: the loss at position t predicts labels[t + 1].
        self._num_tokens = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in self.examples)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    @property
    def num_tokens(self) -> int:
        """Target tokens over all examples (labels other than ``IGNORE_INDEX``, position 0 excluded)."""
        return self._num_tokens

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch, as :func:`collate` gives it."""
        chosen: list[int] = []
        while len(chosen) < self.batch_size:
            take = self._order[self._position : self._position + self.batch_size - len(chosen)]
            chosen.extend(take)
            self._position += len(take)
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
        return collate([self.examples[i] for i in chosen], self.pad_id)

    def state(self) -> dict[str, int]:
        """Where the stream stands, for :meth:`restore`."""
        return {"epoch": self._epoch, "position": self._position}

    def seek(self, index: int) -> None:
        """Go to batch number ``index`` of the stream (0: the first): where it stands after ``index`` batches."""
        if index < 0:
            raise ConfigError(f"batch index must be >= 0, got {index}")
        epoch, position = divmod(index * self.batch_size, len(self.examples))
        if epoch != self._epoch:
            self._order = self._permutation(epoch)
        self._epoch, self._position = epoch, position

    def restore(self, state: Mapping[str, object]) -> None:
        """Continue from a :meth:`state` of a stream over the same examples and seed."""
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"state epoch must be a non-negative integer, got {epoch!r}")
        if not isinstance(position, int) or not 0 <= position < len(self.examples):
            raise ConfigError(f"state position must be in [0, {len(self.examples)}), got {position!r}")
        self._epoch, self._position = epoch, position
        self._order = self._permutation(epoch)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that a reader never sees it half-written."""
    # A temp file in the same folder, then os.replace: a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shards(
    pairs: Sequence[tuple[str, str]], num_shards: int, out_dir: str | Path, seed: int = 0, prefix: str = "shard"
) -> list[Path]:
    """An IID split of ``pairs``: a seeded shuffle dealt round-robin into ``num_shards`` JSONL files.

    Shard ``i`` is ``out_dir/{prefix}-{i}.jsonl`` with fields ``prompt``/``response``; returns the paths in order.
    """
    if num_shards < 1:
        raise ConfigError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards > len(pairs):
        raise ConfigError(f"num_shards ({num_shards}) exceeds the number of records ({len(pairs)})")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return write_parts(pairs, [order[shard::num_shards] for shard in range(num_shards)], out_dir, prefix)


def write_parts(
    pairs: Sequence[tuple[str, str]], parts: Sequence[Sequence[int]], out_dir: str | Path, prefix: str
) -> list[Path]:
    """Write ``pairs[i] for i in parts[k]`` to ``out_dir/{prefix}-{k}.jsonl`` (prompt/response), atomically."""
    if not prefix or os.sep in prefix or "/" in prefix:
        raise ConfigError(f"prefix must be a plain file name prefix, got {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(parts):
        lines = [json.dumps({"prompt": pairs[i][0], "response": pairs[i][1]}, ensure_ascii=False) + "\n" for i in part]
        path = out / f"{prefix}-{k}.jsonl"
        write_text_atomic(path, "".join(lines))
        paths.append(path)
    return paths
