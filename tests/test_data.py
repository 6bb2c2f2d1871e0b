"""Data files, tokenization, batching and sharding, on real files and the vendored GPT-2 tokenizer."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import ConfigError, DataError
from splitft.shared.job.data import Batches, Example, collate, tokenize, write_shards
from splitft.shared.job.records import PAIR_FIELDS, load_records
from splitft.shared.model.loss import IGNORE_INDEX
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer

PAIRS = [(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer("tiny-gpt2")


def write_jsonl(path: Path, records: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def examples_of(n: int) -> list[Example]:
    # Distinct first tokens identify each example in a batch.
    return [Example((1000 + i, 7, 8), (IGNORE_INDEX, 8, 9)) for i in range(n)]


# --------------------------------------------------------------------------- load_records


@pytest.mark.parametrize(("prompt_field", "response_field"), PAIR_FIELDS)
def test_jsonl_each_field_pair(tmp_path: Path, prompt_field: str, response_field: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{prompt_field: p, response_field: r, "id": 3} for p, r in PAIRS])
    assert load_records(path) == PAIRS


@pytest.mark.parametrize(("prompt_field", "response_field"), PAIR_FIELDS)
def test_csv_each_field_pair(tmp_path: Path, prompt_field: str, response_field: str) -> None:
    rows = [[p, "x", r] for p, r in PAIRS]
    path = write_csv(tmp_path / "d.csv", [prompt_field, "extra", response_field], rows)
    assert load_records(path) == PAIRS


def test_first_field_pair_wins_and_explicit_fields(tmp_path: Path) -> None:
    records = [{"question": "q", "answer": "a", "prompt": "p", "response": "r", "src": "s", "dst": "d"}]
    path = write_jsonl(tmp_path / "d.json", records)
    assert load_records(path) == [("p", "r")]
    assert load_records(path, "src", "dst") == [("s", "d")]
    assert load_records(path, "question", "answer") == [("q", "a")]
    csv_path = write_csv(tmp_path / "d.csv", ["src", "dst"], [["a,b", 'say "hi"\nthere']])
    assert load_records(csv_path, "src", "dst") == [("a,b", 'say "hi"\nthere')]


def test_empty_lines_skipped_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a", "response": "b"}\n\n  \n{"prompt": "c", "response": "d"}\n', encoding="utf-8")
    assert load_records(path) == [("a", "b"), ("c", "d")]
    assert load_records(path, limit=1) == [("a", "b")]


def test_gsm8k_vendored_file(tmp_path: Path) -> None:
    pairs = load_records(GSM8K / "train.jsonl", limit=25)
    assert len(pairs) == 25
    first = json.loads((GSM8K / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert pairs[0] == (first["question"], first["answer"])
    assert all("####" in answer for _, answer in pairs)
    assert len(load_records(GSM8K / "test.jsonl", "question", "answer", limit=3)) == 3


# --------------------------------------------------------------------------- tokenize and collate


def test_labels_mask_exactly_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = tokenize(PAIRS, tokenizer, max_length=64)
    assert len(examples) == len(PAIRS)
    for (prompt, response), ex in zip(PAIRS, examples, strict=True):
        prompt_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert list(ex.input_ids) == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert len(ex.labels) == len(ex.input_ids)
        n = len(prompt_ids)
        assert all(label == IGNORE_INDEX for label in ex.labels[:n])
        assert ex.labels[n:] == ex.input_ids[n:]
        assert IGNORE_INDEX not in ex.labels[n:]
        assert ex.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex.input_ids[:n]) == prompt + "\n"


def test_truncation_and_dropping(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt, response = "one two three four five", "six seven eight nine ten"
    n_prompt = len(tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"])
    full = tokenize([(prompt, response)], tokenizer, max_length=1000)[0]
    (cut,) = tokenize([(prompt, response)], tokenizer, max_length=n_prompt + 2)
    assert len(cut.input_ids) == n_prompt + 2
    assert cut.input_ids == full.input_ids[: n_prompt + 2]
    assert cut.labels == full.labels[: n_prompt + 2]
    assert cut.input_ids[-1] != tokenizer.eos_token_id  # the EOS went with the truncated tail
    # Only the prompt fits: nothing to learn, the example is dropped; the short one is kept.
    kept = tokenize([(prompt, response), ("hi", "yo")], tokenizer, max_length=n_prompt)
    assert len(kept) == 1
    assert tokenizer.decode(kept[0].input_ids) == "hi\nyo<|endoftext|>"


def test_collate_pads_right(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = tokenize([("a", "b"), ("a longer prompt here", "and a longer answer too")], tokenizer, 64)
    pad = tokenizer.pad_token_id
    input_ids, labels, lengths = collate(examples, pad)
    sizes = [len(e.input_ids) for e in examples]
    assert input_ids.dtype == labels.dtype == lengths.dtype == torch.int64
    assert input_ids.shape == labels.shape == (2, max(sizes))
    assert lengths.tolist() == sizes
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert input_ids[row, :n].tolist() == list(ex.input_ids)
        assert labels[row, :n].tolist() == list(ex.labels)
        assert (input_ids[row, n:] == pad).all()
        assert (labels[row, n:] == IGNORE_INDEX).all()
    assert sizes[0] < sizes[1]  # the first row really was padded


# --------------------------------------------------------------------------- Batches


def take(batches: Batches, n: int) -> list[list[int]]:
    return [batches.next()[0][:, 0].tolist() for _ in range(n)]


def test_batches_deterministic_and_seeded() -> None:
    examples = examples_of(10)
    assert take(Batches(examples, 3, pad_id=0, seed=5), 8) == take(Batches(examples, 3, pad_id=0, seed=5), 8)
    assert take(Batches(examples, 3, pad_id=0, seed=5), 8) != take(Batches(examples, 3, pad_id=0, seed=6), 8)


def test_batches_cover_each_epoch_and_wrap() -> None:
    examples = examples_of(12)
    batches = Batches(examples, 4, pad_id=0, seed=1)
    for _ in range(3):
        epoch = [i for batch in take(batches, 3) for i in batch]
        assert sorted(epoch) == [1000 + i for i in range(12)]
    # Not a multiple: every batch is full, and two epochs (10 + 10 examples) are five batches of four.
    wrapped = Batches(examples_of(10), 4, pad_id=0, seed=1)
    flat = [i for batch in take(wrapped, 5) for i in batch]
    assert all(len(b) == 4 for b in take(Batches(examples_of(10), 4, pad_id=0), 7))
    assert sorted(flat[:10]) == sorted(flat[10:]) == [1000 + i for i in range(10)]
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    # Epoch e is drawn from seed + e: epoch 1 of seed 1 is epoch 0 of seed 2.
    assert flat[10:] == [i for batch in take(Batches(examples_of(10), 5, pad_id=0, seed=2), 2) for i in batch]
    assert wrapped.state() == {"epoch": 2, "position": 0}
    # A batch larger than the data set spans several epochs.
    assert take(Batches(examples_of(3), 7, pad_id=0), 1)[0].count(1000) >= 2


def test_batches_state_restore_resumes_exactly() -> None:
    examples = examples_of(10)
    first = Batches(examples, 3, pad_id=0, seed=2)
    take(first, 4)
    saved = json.loads(json.dumps(first.state()))  # a state survives a round trip through JSON
    expected = take(first, 9)
    resumed = Batches(examples, 3, pad_id=0, seed=2)
    resumed.restore(saved)
    assert take(resumed, 9) == expected


def test_num_tokens_counts_targets_only() -> None:
    examples = [Example((1, 2, 3, 4), (IGNORE_INDEX, IGNORE_INDEX, 3, 4)), Example((5, 6), (5, 6))]
    # 2 from the first; 1 from the second, whose position 0 is never predicted.
    assert Batches(examples, 1, pad_id=0).num_tokens == 3


# --------------------------------------------------------------------------- write_shards


def test_write_shards_round_trip(tmp_path: Path) -> None:
    pairs = [*PAIRS, ('ünïcode "quoted"\nline', "réponse")]
    paths = write_shards(pairs, 4, tmp_path / "shards", seed=3)
    assert [p.name for p in paths] == [f"shard-{i}.jsonl" for i in range(4)]
    shards = [load_records(p) for p in paths]
    assert sorted(pair for shard in shards for pair in shard) == sorted(pairs)
    assert sorted(len(s) for s in shards) == [3, 3, 3, 4]
    assert not [p for p in (tmp_path / "shards").iterdir() if p not in paths]  # no temp files left
    again = write_shards(pairs, 4, tmp_path / "again", seed=3, prefix="dev")
    assert [load_records(p) for p in again] == shards
    other = write_shards(pairs, 4, tmp_path / "other", seed=4)
    assert [load_records(p) for p in other] != shards


# --------------------------------------------------------------------------- errors


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: no such data file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.txt: unknown data file suffix '\.txt'"):
        load_records(tmp_path / "d.txt")
    (tmp_path / "bin.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl: not UTF-8"):
        load_records(tmp_path / "bin.jsonl")


def test_jsonl_record_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"prompt": "a", "response": "b"}\n'
    cases = {
        good + "\n" + '{"prompt": "a", "response": \n': r"bad\.jsonl:3: malformed JSON",
        good + '["a", "b"]\n': r"bad\.jsonl:2: a record must be a JSON object, got list",
        good + '{"prompt": "a"}\n': r"bad\.jsonl:2: record lacks field\(s\) 'response'",
        good + '{"prompt": "a", "response": 3}\n': r"bad\.jsonl:2: field 'response' must be a string, got int",
        '{"body": "a", "label": "b"}\n': r"bad\.jsonl:1: no field 'messages', 'text' or any of the pairs "
        r"prompt/completion.*\['body', 'label'\]; name a pair's fields with --prompt-field and --response-field",
        '[{"prompt": "a", "response": "b"}]\n': r"bad\.jsonl: holds a JSON array; SplitFT reads one JSON object per line",
        '[\n  {"prompt": "a", "response": "b"}\n]\n': r"bad\.jsonl: holds a JSON array.*jq -c",
        "\n\n": r"bad\.jsonl: no usable records",
    }
    for text, message in cases.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=message):
            load_records(path)
    array = tmp_path / "data.json"  # a .json file is read as JSONL too: an array gets its own hint
    array.write_text('[{"prompt": "a", "response": "b"}]', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"data\.json: holds a JSON array; SplitFT reads one JSON object per line \(JSONL\)"
    ):
        load_records(array)
    path.write_text(good, encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: record lacks field\(s\) 'src', 'dst'"):
        load_records(path, "src", "dst")


def test_csv_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", ["body", "label"], [["a", "b"]])
    with pytest.raises(DataError, match=r"bad\.csv \(columns\): no field 'messages', 'text' or any of the pairs"):
        load_records(path)
    with pytest.raises(DataError, match=r"bad\.csv: no column\(s\) 'output' in \['body', 'label'\]"):
        load_records(path, "body", "output")
    path.write_text("prompt,response\na,b\nc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: record lacks field\(s\) 'response'"):
        load_records(path)
    path.write_text("prompt,response\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv: no usable records"):
        load_records(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv: the CSV file has no header"):
        load_records(path)


def test_config_errors(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ConfigError, match="prompt_field and response_field"):
        load_records(path, prompt_field="prompt")
    with pytest.raises(ConfigError, match="limit"):
        load_records(path, limit=0)
    with pytest.raises(ConfigError, match="max_length"):
        tokenize(PAIRS, tokenizer, max_length=1)
    with pytest.raises(ConfigError, match="batch_size"):
        Batches(examples_of(3), 0, pad_id=0)
    with pytest.raises(ConfigError, match="examples"):
        Batches([], 1, pad_id=0)
    with pytest.raises(ConfigError, match="position"):
        Batches(examples_of(3), 1, pad_id=0).restore({"epoch": 0, "position": 3})
    with pytest.raises(ConfigError, match="num_shards"):
        write_shards(PAIRS, 0, tmp_path / "s")
    with pytest.raises(ConfigError, match=r"num_shards \(13\) exceeds the number of records \(12\)"):
        write_shards(PAIRS, 13, tmp_path / "s")
    with pytest.raises(ConfigError, match="prefix"):
        write_shards(PAIRS, 2, tmp_path / "s", prefix="a/b")
    assert not (tmp_path / "s").exists()  # argument errors are raised before anything is written


def test_batches_seek_lands_where_the_stream_would_be() -> None:
    """Batch ``i`` of a stream is a function of the seed and ``i``: a round that runs again sees the same data."""
    for batch_size in (1, 2, 3, 7, 9):  # dividing the 7 examples, not dividing them, larger than an epoch
        stream = Batches(examples_of(7), batch_size, pad_id=0, seed=3)
        seen = [stream.next()[0] for _ in range(12)]
        for index in (0, 1, 5, 11, 3):
            jumped = Batches(examples_of(7), batch_size, pad_id=0, seed=3)
            jumped.seek(index)
            assert torch.equal(jumped.next()[0], seen[index]), (batch_size, index)
    with pytest.raises(ConfigError, match="batch index"):
        stream.seek(-1)
