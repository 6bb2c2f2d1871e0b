"""The study's final evaluation of a trained adapter: perplexity on more of the task's evaluation records and the
task's score of greedy answers (:mod:`.tasks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitft.bench.study.methods import eval_batches
from splitft.bench.study.settings import StudySettings
from splitft.bench.study.tasks import Task, held_out, text_scores
from splitft.coordinator.answers import generate, gsm8k_answer, load_model
from splitft.shared.job.data import prompt_text
from splitft.shared.model.loss import evaluate_lm, logits_loss
from splitft.shared.model.tokenizer import load_tokenizer


def final_evaluation(settings: StudySettings, base: Path, adapter: Path, task: Task) -> dict[str, Any]:
    """Perplexity and next-token accuracy on more of the task's evaluation records, and the task's score of
    greedy answers: GSM8K exact match, or E2E's BLEU and ROUGE-L (none for wikitext)."""
    tokenizer = load_tokenizer(str(base))
    model = load_model(base, adapter)
    evals = eval_batches(tokenizer, settings.max_length, settings.final_eval_samples, task.eval)
    result = evaluate_lm(lambda i, m, y: logits_loss(model(input_ids=i, attention_mask=m).logits, y), evals)
    final: dict[str, Any] = {"final_ppl": round(result.perplexity, 4), "final_acc": round(result.accuracy, 6)}
    refs = held_out(task)
    if not refs:
        return final
    # The first gen_samples prompts that leave the model room to answer (all of GSM8K test and E2E at 256).
    room_needed = min(settings.gen_tokens, settings.max_length // 4)

    def length(prompt: str) -> int:
        return len(tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=False)["input_ids"])

    problems = [r for r in refs if length(r.prompt) <= settings.max_length - room_needed][: settings.gen_samples]
    # The answer may run past the training length up to the model's own context (a real model's is thousands).
    context = max(settings.max_length, int(getattr(model.config, "max_position_embeddings", 0) or 0))
    answers: list[str] = []
    for i in range(0, len(problems), 8):
        chunk = problems[i : i + 8]
        room = max(context - max(length(r.prompt) for r in chunk), 1)
        answers += generate(model, tokenizer, [r.prompt for r in chunk], max_new_tokens=min(settings.gen_tokens, room))
    if task.name == "e2e":
        return {**final, **text_scores([a.strip() for a in answers], problems), "e2e_problems": len(problems)}
    got = [gsm8k_answer(a) for a in answers]
    return {
        **final,
        "gsm8k_correct": sum(
            g is not None and g == gsm8k_answer(r.answers[0]) for g, r in zip(got, problems, strict=True)
        ),
        "gsm8k_answered": sum(g is not None for g in got),
        "gsm8k_problems": len(problems),
    }
