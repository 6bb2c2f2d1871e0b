"""The study's tasks: what the devices learn, what is evaluated, and how the final answers are scored.

* ``gsm8k``: grade-school maths problems and worked answers (the vendored GSM8K train and test splits); the
  final score is exact match of the number after ``####`` in greedy answers;
* ``wikitext``: language modelling on WikiText-2 paragraphs (the SplitFT paper's task): the devices hold
  paragraphs of the validation split, the evaluation reads the test split; perplexity only;
* ``e2e``: E2E NLG, meaning representation -> restaurant description (SplitLoRA's task): the devices hold the
  validation pairs (the training split is not vendored), the final score is BLEU and ROUGE-L of greedy
  descriptions of held-out test meaning representations against all their references.

A task's records are written once to JSONL files in the study's folder, so that the split runs read the same
records as the in-process methods (``LocalRun.data`` / ``JobConfig.eval_data``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splitft.bench.study.metrics import bleu, rouge_l
from splitft.bench.study.settings import TASKS
from splitft.shared.job.records import Pair, Record, Text, load_records, record_json
from splitft.shared.model.tokenizer import DATASETS, GSM8K

MIN_PARAGRAPH_WORDS = 20  # WikiText-2 lines shorter than this are headings' leftovers and captions


@dataclass(frozen=True)
class Task:
    """One task's files: ``train`` (records the devices share out) and ``eval`` (records evaluated)."""

    name: str
    train: Path
    eval: Path
    quality: str  # the final score's name in reports: "GSM8K correct", "BLEU", or "" (perplexity only)


@dataclass(frozen=True)
class Reference:
    """A held-out prompt and every reference answer for it (E2E has several per meaning representation)."""

    prompt: str
    answers: tuple[str, ...]


def wikitext_paragraphs(path: Path) -> list[Text]:
    """The paragraphs of a WikiText-2 file (one a line), without headings (`` = Title = ``) and short lines."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [
        Text(line) for line in lines if line and not line.startswith("=") and len(line.split()) >= MIN_PARAGRAPH_WORDS
    ]


def e2e_pairs(path: Path) -> list[Pair]:
    """The ``meaning representation||text`` lines of an E2E file, as pairs."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            mr, sep, text = line.partition("||")
            if not sep or not mr.strip() or not text.strip():
                raise ValueError(f"{path}: line {number} is not 'meaning representation||text'")
            pairs.append(Pair(mr.strip(), text.strip()))
    return pairs


def references(pairs: Sequence[Pair]) -> list[Reference]:
    """The distinct prompts in order of first appearance, each with all its answers."""
    grouped: dict[str, list[str]] = {}
    for prompt, answer in pairs:
        grouped.setdefault(prompt, []).append(answer)
    return [Reference(prompt, tuple(answers)) for prompt, answers in grouped.items()]


def _write(records: Sequence[Record], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record_json(r)) + "\n" for r in records), encoding="utf-8")
    return path


def prepare_task(name: str, folder: Path) -> Task:
    """The task's record files (written under ``folder`` where they are not the vendored files themselves)."""
    if name == "gsm8k":
        return Task(name, GSM8K / "train.jsonl", GSM8K / "test.jsonl", "GSM8K correct")
    if name == "wikitext":
        source = DATASETS / "wikitext-2"
        train = _write(wikitext_paragraphs(source / "valid.txt.gz"), folder / "wikitext-train.jsonl")
        evals = _write(wikitext_paragraphs(source / "test.txt.gz"), folder / "wikitext-eval.jsonl")
        return Task(name, train, evals, "")
    if name == "e2e":
        source = DATASETS / "e2e"
        train = _write(e2e_pairs(source / "valid.txt.gz"), folder / "e2e-train.jsonl")
        # One pair per test meaning representation for the perplexity (its first reference), in file order.
        firsts = [Pair(r.prompt, r.answers[0]) for r in references(e2e_pairs(source / "test.txt.gz"))]
        evals = _write(firsts, folder / "e2e-eval.jsonl")
        return Task(name, train, evals, "BLEU")
    raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")


def held_out(task: Task) -> list[Reference]:
    """The prompts the final evaluation answers by generation, with their references (none for wikitext)."""
    if task.name == "e2e":
        return references(e2e_pairs(DATASETS / "e2e" / "test.txt.gz"))
    if task.name == "gsm8k":
        return [Reference(r.prompt, (r.completion,)) for r in load_records(task.eval) if isinstance(r, Pair)]
    return []


def text_scores(hypotheses: Sequence[str], refs: Sequence[Reference]) -> dict[str, float]:
    """BLEU and ROUGE-L (0-100) of generated texts against each prompt's references."""
    answers = [r.answers for r in refs]
    return {"bleu": round(bleu(hypotheses, answers), 4), "rouge_l": round(rouge_l(hypotheses, answers), 4)}
