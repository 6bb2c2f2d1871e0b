"""What a trained model answers: greedy generation in batches, and how GSM8K-style answers are scored.

A prompt is rendered exactly as training renders the part before an answer (:func:`splitft.shared.job.data.prompt_text`:
the chat template's generation prompt when the tokenizer has one), so what ``generate`` shows is what the
fleet trained. GSM8K answers end in ``#### N``; :func:`final_number` reads that, or else the last number
written, so that a base model that does not know the format still gets credit for a right number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import DataError, ModelError
from splitft.shared.job.data import prompt_text
from splitft.shared.job.records import ASSISTANT, Chat, Pair, Record, load_records
from splitft.shared.model.lora import quiet_peft
from splitft.shared.model.split import load_base_model
from splitft.shared.model.tokenizer import load_tokenizer

FORMATTED = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")

#: a prompt: one user message, or a conversation so far (role, content)
Prompt = str | tuple[tuple[str, str], ...]


def _number(text: str) -> str:
    return text.replace(",", "").rstrip(".")


def gsm8k_answer(text: str) -> str | None:
    """The number after GSM8K's ``####`` marker, or None when the text has none."""
    match = FORMATTED.search(text)
    return _number(match.group(1)) if match else None


def final_number(text: str) -> str | None:
    """The answer's final number: after ``####`` when it is there, else the last number in the text."""
    marked = gsm8k_answer(text)
    if marked is not None:
        return marked
    numbers = NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def prompts_of(records: Sequence[Record], where: str) -> list[tuple[Prompt, str]]:
    """(prompt, reference answer) of every record: a pair's prompt and completion, a conversation up to its last
    assistant turn and that turn. Text records hold no question to answer: a DataError."""
    out: list[tuple[Prompt, str]] = []
    for record in records:
        if isinstance(record, Pair):
            out.append((record.prompt, record.completion))
        elif isinstance(record, Chat):
            last = max(i for i, (role, _) in enumerate(record.messages) if role == ASSISTANT)
            out.append((record.messages[:last], record.messages[last][1]))
        else:
            raise DataError(f"{where}: holds text records; generating answers needs prompts (pairs or messages)")
    return out


def load_model(source: str | Path, adapter: Path | None = None, device: str = "cpu") -> Any:
    """The base model of ``source`` (preset, folder or GGUF file), with a PEFT adapter folder on top if given,
    in eval mode."""
    model: Any = load_base_model(source, device=device)
    model.eval()
    return model if adapter is None else with_adapter(model, adapter)


def with_adapter(model: Any, adapter: Path) -> Any:
    """``model`` with the PEFT adapter folder ``adapter`` on top, in eval mode."""
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        with quiet_peft():
            adapted = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load the adapter {adapter}: {exc}") from exc
    adapted.eval()
    return adapted


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 256,
    chat_template: str | bool = "auto",
    batch_size: int = 8,
    device: str = "cpu",
) -> list[str]:
    """Greedy answers, in the order of ``prompts``; each stops at EOS or after ``max_new_tokens``."""
    texts = [prompt_text(prompt, tokenizer, chat_template) for prompt in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # a batch's prompts end where its answers start
    answers: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            width = batch["input_ids"].shape[1]
            answers += [a.strip() for a in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


@dataclass(frozen=True)
class AnswerScores:
    """How GSM8K-style answers compare with the references."""

    problems: int
    exact: int  # final number equal to the reference's
    formatted: int  # answers that end in GSM8K's ``#### N``

    @property
    def exact_share(self) -> float:
        return self.exact / max(self.problems, 1)

    @property
    def formatted_share(self) -> float:
        return self.formatted / max(self.problems, 1)


def score(answers: Sequence[str], references: Sequence[str]) -> AnswerScores:
    """Exact match of the final number (the reference's ``#### N``, else its last number) and the share of
    answers in ``#### N`` form."""
    exact = sum(
        got is not None and got == final_number(ref)
        for got, ref in zip(map(final_number, answers), references, strict=True)
    )
    formatted = sum(gsm8k_answer(a) is not None for a in answers)
    return AnswerScores(len(answers), exact, formatted)


@dataclass(frozen=True)
class Comparison:
    """A model's answers to held-out problems before and after fine-tuning (the base, then base + adapter)."""

    prompts: list[Prompt]
    references: list[str]
    before: list[str]
    after: list[str]

    def scores(self) -> tuple[AnswerScores, AnswerScores]:
        return score(self.before, self.references), score(self.after, self.references)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"prompt": p if isinstance(p, str) else [list(turn) for turn in p], "reference": r, "before": b, "after": a}
            for p, r, b, a in zip(self.prompts, self.references, self.before, self.after, strict=True)
        ]


def compare(
    source: str | Path,
    adapter: Path,
    data: Path,
    problems: int,
    *,
    chat_template: str | bool = "auto",
    max_new_tokens: int = 256,
    device: str = "cpu",
) -> Comparison:
    """Greedy answers to the first ``problems`` prompts of ``data``, from the base model and from base + adapter."""
    asked = prompts_of(load_records(data, limit=problems), str(data))
    prompts, references = [p for p, _ in asked], [r for _, r in asked]
    tokenizer = load_tokenizer(source)

    def answer(model: Any) -> list[str]:
        return generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat_template=chat_template, device=device
        )

    base = load_model(source, device=device)
    before = answer(base)  # the base is loaded once: the adapter then goes on top of it
    return Comparison(prompts, references, before, answer(with_adapter(base, adapter)))
