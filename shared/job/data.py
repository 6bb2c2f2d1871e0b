"""The training data of one device (or the coordinator's eval set): tokens, batches, shards.

Records (text, prompt/completion pairs, conversations; :mod:`splitft.shared.job.records`) become examples whose
labels are ``IGNORE_INDEX`` wherever nothing is to be learnt: on a pair's prompt, on every turn of a
conversation but the assistant's. Pairs and conversations go through the tokenizer's chat template when it
has one (``chat_template``). :class:`Batches` is endless and deterministic from a seed, and its position can
be saved and restored so that a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import ConfigError, DataError
from splitft.shared.job.records import ASSISTANT, Chat, Record, Text, load_records, record_json
from splitft.shared.model.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

#: ``chat_template`` settings: "auto" renders pairs and conversations with the tokenizer's chat template when it
#: has one; true requires one; false never uses one (``prompt + "\n"``, then the answer and EOS)
CHAT_TEMPLATE_MODES: tuple[str | bool, ...] = ("auto", True, False)


def check_chat_template(value: object, name: str = "chat_template") -> None:
    if value not in CHAT_TEMPLATE_MODES or (value != "auto" and type(value) is not bool):
        raise ConfigError(f'{name} must be "auto", true or false, got {value!r}')


def uses_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | bool = "auto") -> bool:
    """Whether pairs and conversations are rendered with the tokenizer's chat template."""
    check_chat_template(chat_template)
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has:
        raise ConfigError("chat_template is true, but the model's tokenizer has no chat template")
    return has if chat_template == "auto" else bool(chat_template)


# A record becomes pieces of text, each trained on (its tokens are targets) or not; None stands for the EOS token.
_Piece = tuple[str | None, bool]


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]], prompt: bool) -> str:
    turns = [{"role": role, "content": content} for role, content in messages]
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
    if not isinstance(text, str):
        raise ConfigError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def _chat_pieces(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]]) -> list[_Piece]:
    """A conversation through the chat template, cut where each assistant turn starts and ends.

    Each assistant turn is what the template adds after the conversation so far rendered with the generation
    prompt, exactly the text a model is asked to continue at inference, so training and ``generate`` agree.
    """
    pieces: list[_Piece] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != ASSISTANT:
            continue
        asked = _render(tokenizer, messages[:i], prompt=True)
        answered = _render(tokenizer, messages[: i + 1], prompt=False)
        if not (asked.startswith(done) and answered.startswith(asked)):
            raise ConfigError(
                "the tokenizer's chat template renders a conversation differently from its beginning (it is not "
                "prefix-stable), so the assistant turns cannot be told apart: set chat_template = false"
            )
        pieces += [(asked[len(done) :], False), (answered[len(asked) :], True)]
        done = answered
    return pieces  # turns after the last assistant turn teach nothing: left out


def _pieces(record: Record, tokenizer: PreTrainedTokenizerBase, template: bool) -> list[_Piece]:
    if isinstance(record, Text):
        return [(record.text, True), (None, True)]
    if isinstance(record, Chat):
        messages = record.messages
    else:
        prompt, completion = record  # a Pair, or any (prompt, completion) tuple
        messages = (("user", prompt), (ASSISTANT, completion))
    if template:
        return _chat_pieces(tokenizer, messages)
    pieces: list[_Piece] = []
    for role, content in messages:
        pieces += [(content, True), (None, True)] if role == ASSISTANT else [(content + "\n", False)]
    return pieces


def encode(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, chat_template: str | bool = "auto"
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every record, untruncated; labels are ``IGNORE_INDEX`` where nothing is learnt.

    Pieces are tokenized one by one (never across a prompt/answer border), in one batched call.
    """
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ConfigError("the tokenizer has no EOS token")
    template = uses_template(tokenizer, chat_template)
    pieces = [_pieces(record, tokenizer, template) for record in records]
    texts = [text for record in pieces for text, _ in record if text is not None]
    ids = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    encoded = []
    for record in pieces:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in record:
            tokens = [eos] if text is None else list(next(ids))
            input_ids += tokens
            labels += tokens if trained else [IGNORE_INDEX] * len(tokens)
        encoded.append((input_ids, labels))
    return encoded


@dataclass(frozen=True)
class Example:
    """One tokenized record (or one chunk of a long text)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where nothing is learnt (a prompt, a user turn, padding)


def tokenize(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int, chat_template: str | bool = "auto"
) -> list[Example]:
    """Examples of at most ``max_length`` tokens (see :func:`encode` for what each record becomes).

    A text longer than ``max_length`` becomes several examples that overlap by one token, so that every token
    after the first is a target exactly once; a pair or conversation is cut at ``max_length`` (counted in
    the log), and dropped when no target token is left.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    examples = []
    cut = dropped = 0
    for record, (ids, labels) in zip(records, encode(records, tokenizer, chat_template), strict=True):
        if isinstance(record, Text):
            stride = max_length - 1
            for start in range(0, max(len(ids) - 1, 1), stride):
                chunk = ids[start : start + max_length]
                if len(chunk) >= 2:
                    examples.append(Example(tuple(chunk), tuple(labels[start : start + max_length])))
            continue
        if len(ids) > max_length:
            cut += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never a target
            dropped += 1
            continue
        examples.append(Example(tuple(ids), tuple(labels)))
    if cut:
        log.info(
            "%d of %d records are longer than max_length %d: cut there (%d with nothing left to learn dropped)",
            cut, len(records), max_length, dropped,
        )  # fmt: skip
    return examples


def prompt_text(
    prompt: str | Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, chat_template: str | bool = "auto"
) -> str:
    """The text a model continues to answer ``prompt`` (a user message, or a conversation so far), rendered as
    training renders the part before an answer."""
    messages = (("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    if uses_template(tokenizer, chat_template):
        return _render(tokenizer, messages, prompt=True)
    # Without a template, the turns so far as training renders them (an earlier answer ends in EOS).
    return "".join(
        tokenizer.eos_token if text is None else text for text, _ in _pieces(Chat(messages), tokenizer, False)
    )


def eval_examples(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    limit: int | None = None,
    chat_template: str | bool = "auto",
) -> list[Example]:
    """The evaluation examples of a data file: those of its first ``limit`` records. None fitting is a
    DataError (an evaluation on nothing would report a perplexity of 1)."""
    records = load_records(source, limit=limit)
    examples = tokenize(records, tokenizer, max_length, chat_template)
    if not examples:
        raise DataError(
            f"{source}: none of the {len(records)} evaluation records read fits max_length {max_length} (each needs "
            "its prompt and at least one answer token): use shorter prompts or a larger max_length"
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
    records: Sequence[Record], num_shards: int, out_dir: str | Path, seed: int = 0, prefix: str = "shard"
) -> list[Path]:
    """An IID split of ``records``: a seeded shuffle dealt round-robin into ``num_shards`` JSONL files.

    Shard ``i`` is ``out_dir/{prefix}-{i}.jsonl`` (see :func:`write_parts`); returns the paths in order.
    """
    if num_shards < 1:
        raise ConfigError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards > len(records):
        raise ConfigError(f"num_shards ({num_shards}) exceeds the number of records ({len(records)})")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return write_parts(records, [order[shard::num_shards] for shard in range(num_shards)], out_dir, prefix)


def write_parts(
    records: Sequence[Record], parts: Sequence[Sequence[int]], out_dir: str | Path, prefix: str
) -> list[Path]:
    """Write ``records[i] for i in parts[k]`` to ``out_dir/{prefix}-{k}.jsonl``, atomically, each record in the
    fields :mod:`splitft.shared.job.records` reads first (``text``; ``prompt``/``completion``; ``messages``)."""
    if not prefix or os.sep in prefix or "/" in prefix:
        raise ConfigError(f"prefix must be a plain file name prefix, got {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(parts):
        lines = [json.dumps(record_json(records[i]), ensure_ascii=False) + "\n" for i in part]
        path = out / f"{prefix}-{k}.jsonl"
        write_text_atomic(path, "".join(lines))
        paths.append(path)
    return paths
