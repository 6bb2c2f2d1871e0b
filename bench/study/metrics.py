"""Text-generation scores of the study, computed with maintained packages: corpus BLEU with sacrebleu (its
default 13a tokenisation, as E2E and SplitLoRA report it) and ROUGE-L with Google's rouge-score (the best F1
over a prompt's references, averaged). Both on a 0-100 scale."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU of ``hypotheses`` against each one's references (any number of them, at least one)."""
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    width = max(len(refs) for refs in references)
    # sacrebleu takes reference *streams*: the k-th reference of every hypothesis, None where it has fewer.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)  # type: ignore[arg-type]  # None: no more


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over hypotheses of the best ROUGE-L F1 against its references."""
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)
