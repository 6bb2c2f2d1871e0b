"""Data as Hugging Face users write it: text, prompt/completion and messages records in JSONL, CSV and Parquet,
the chat template's rendering and its loss mask, long texts chunked, and every refusal naming file, line and field."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import ConfigError, DataError
from splitft.shared.job.data import encode, prompt_text, tokenize, write_shards
from splitft.shared.job.records import Chat, Pair, Text, load_records
from splitft.shared.model.loss import IGNORE_INDEX
from splitft.shared.model.tokenizer import load_tokenizer

from gguf_files import CHAT_TEMPLATE

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3 plus 3?"},
            {"role": "assistant", "content": "It is 6."},
        ]
    },
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
]


@pytest.fixture(scope="module")
def plain() -> PreTrainedTokenizerBase:
    return load_tokenizer("tiny-gpt2")  # the GPT-2 tokenizer: no chat template


@pytest.fixture(scope="module")
def chatty(plain: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer = copy.deepcopy(plain)
    tokenizer.chat_template = CHAT_TEMPLATE  # ChatML, as SmolLM2's
    return tokenizer


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], labels: Sequence[int]) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


# --------------------------------------------------------------------------- the three kinds, three formats


def test_each_kind_from_jsonl_csv_and_parquet(tmp_path: Path) -> None:
    chat = Chat((("user", "What is 2 plus 2?"), ("assistant", "It is 4.")))
    cases = {
        "text": ([{"text": "A whole document.", "id": 1}], Text("A whole document.")),
        "pair": ([{"prompt": "2+2?", "completion": "4"}], Pair("2+2?", "4")),
        "chat": ([{"messages": [{"role": r, "content": c} for r, c in chat.messages]}], chat),
    }
    for name, (rows, expected) in cases.items():
        assert load_records(write_jsonl(tmp_path / f"{name}.jsonl", rows)) == [expected], name
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        assert load_records(tmp_path / f"{name}.parquet") == [expected], name
    (tmp_path / "text.csv").write_text('text\n"A whole document."\n', encoding="utf-8")
    (tmp_path / "pair.csv").write_text("prompt,completion\n2+2?,4\n", encoding="utf-8")
    cell = json.dumps(cases["chat"][0][0]["messages"]).replace('"', '""')
    (tmp_path / "chat.csv").write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    for name, (_, expected) in cases.items():
        assert load_records(tmp_path / f"{name}.csv") == [expected], name


def test_refusals_name_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(CHATS[1]) + "\n"
    cases = {
        good
        + '{"messages": [{"role": "user", "content": "hi"}]}\n': r"bad\.jsonl:2: the conversation has no assistant",
        good + '{"messages": []}\n': r"bad\.jsonl:2: field 'messages' must be a non-empty list",
        good + '{"messages": [{"role": "user", "content": 3}]}\n': r"bad\.jsonl:2: messages\[0\]\.content must be a "
        r"string, got int",
        good + '{"messages": [{"content": "x"}]}\n': r"bad\.jsonl:2: messages\[0\]\.role must be a non-empty string",
        good + '{"messages": ["hi"]}\n': r"bad\.jsonl:2: messages\[0\] must be an object",
        good + '{"text": "a"}\n': r"bad\.jsonl:2: record lacks field\(s\) 'messages'",  # one kind per file
        '{"text": 5}\n': r"bad\.jsonl:1: field 'text' must be a string, got int",
    }
    for text, message in cases.items():
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=message):
            load_records(bad)
    csv = tmp_path / "bad.csv"
    csv.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:2: field 'messages' is not a JSON list"):
        load_records(csv)
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: record lacks field\(s\) 'completion'"):
        load_records(tmp_path / "bad.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_records(tmp_path / "broken.parquet")


# --------------------------------------------------------------------------- the loss mask


def test_chat_template_trains_on_assistant_turns_only(chatty: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """No token of a system or user turn may count in the loss; every token of an assistant's answer does."""
    records = load_records(write_jsonl(tmp_path / "chats.jsonl", CHATS))
    (long, short) = tokenize(records, chatty, max_length=1024)
    whole = chatty.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    assert chatty.decode(long.input_ids) == whole  # the template's own rendering, token for token
    assert trained_text(chatty, long.input_ids, long.labels) == "It is 4.<|im_end|>\nIt is 6.<|im_end|>\n"
    masked = chatty.decode([t for t, label in zip(long.input_ids, long.labels, strict=True) if label == IGNORE_INDEX])
    for turn in ("You add numbers.", "What is 2 plus 2?", "And 3 plus 3?", "<|im_start|>assistant\n"):
        assert turn in masked
    assert trained_text(chatty, short.input_ids, short.labels) == "hi<|im_end|>\n"
    # The prompt a model is asked to continue at inference is exactly what training masked before the answer.
    asked = prompt_text((("user", "Say hi."),), chatty)
    assert chatty.decode(short.input_ids).startswith(asked) and asked.endswith("<|im_start|>assistant\n")
    assert chatty.decode([t for t, label in zip(short.input_ids, short.labels, strict=True) if label == -100]) == asked


def test_pairs_take_the_template_when_there_is_one(
    chatty: PreTrainedTokenizerBase, plain: PreTrainedTokenizerBase
) -> None:
    pair = [Pair("What is 2 plus 2?", "It is 4.")]
    (templated,) = tokenize(pair, chatty, 256)
    assert chatty.decode(templated.input_ids).startswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n")
    assert trained_text(chatty, templated.input_ids, templated.labels) == "It is 4.<|im_end|>\n"
    (bare,) = tokenize(pair, chatty, 256, chat_template=False)  # as without a template: prompt, newline, answer, EOS
    assert bare == tokenize(pair, plain, 256)[0]
    assert chatty.decode(bare.input_ids) == "What is 2 plus 2?\nIt is 4.<|endoftext|>"
    assert trained_text(chatty, bare.input_ids, bare.labels) == "It is 4.<|endoftext|>"
    with pytest.raises(ConfigError, match="chat_template is true, but the model's tokenizer has no chat template"):
        tokenize(pair, plain, 256, chat_template=True)
    with pytest.raises(ConfigError, match='chat_template must be "auto", true or false'):
        tokenize(pair, plain, 256, chat_template="yes")
    # A conversation without a template: each turn on its line, the assistant's answers trained with their EOS.
    (chat,) = tokenize(
        [Chat((("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Ciao")))], plain, 64
    )
    assert plain.decode(chat.input_ids) == "Hi\nHello<|endoftext|>Bye\nCiao<|endoftext|>"
    assert trained_text(plain, chat.input_ids, chat.labels) == "Hello<|endoftext|>Ciao<|endoftext|>"


def test_a_template_that_rewrites_the_past_is_refused(chatty: PreTrainedTokenizerBase) -> None:
    odd = copy.deepcopy(chatty)  # drops earlier assistant turns, as some reasoning templates do
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat = Chat((("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")))
    with pytest.raises(ConfigError, match="not prefix-stable"):
        tokenize([chat], odd, 256)


# --------------------------------------------------------------------------- long texts


def test_long_text_is_chunked_not_cut(plain: PreTrainedTokenizerBase) -> None:
    document = " ".join(f"word{i}" for i in range(300))
    ((ids, labels),) = encode([Text(document)], plain)
    assert ids == labels and ids[-1] == plain.eos_token_id  # every token is a target, EOS included
    chunks = tokenize([Text(document)], plain, max_length=64)
    assert len(chunks) == -(-(len(ids) - 1) // 63) > 1
    assert all(len(c.input_ids) <= 64 for c in chunks)
    # Chunks overlap by one token, so every token after the first is a target exactly once (position 0 never is).
    targets = [t for c in chunks for t in c.labels[1:]]
    assert targets == ids[1:]
    assert [c.input_ids[0] for c in chunks[1:]] == [chunks[i].input_ids[-1] for i in range(len(chunks) - 1)]


def test_pairs_longer_than_max_length_are_cut_and_dropped_when_nothing_is_left(plain: PreTrainedTokenizerBase) -> None:
    examples = tokenize([Pair("one two three four five six", "seven eight"), Pair("hi", "yo")], plain, max_length=4)
    assert [plain.decode(e.input_ids) for e in examples] == ["hi\nyo<|endoftext|>"]


# --------------------------------------------------------------------------- shards keep the kind


def test_shards_keep_every_kind(tmp_path: Path) -> None:
    records = [Text("doc one"), Text("doc two")]
    chats = load_records(write_jsonl(tmp_path / "c.jsonl", CHATS))
    for kind, rows in (("text", records), ("chat", chats)):
        paths = write_shards(rows, 2, tmp_path / kind, seed=0)
        read = [r for p in paths for r in load_records(p)]
        assert len(read) == len(rows) and set(read) == set(rows), kind
