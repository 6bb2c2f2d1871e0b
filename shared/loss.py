"""Losses of a causal LM: next-token cross-entropy over target positions, and evaluation over batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TargetLoss:
    loss_sum: torch.Tensor  # summed cross-entropy over the batch's targets (a scalar with its graph)
    tokens: int  # the targets
    correct: int  # targets predicted right (argmax)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_targets: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``; ``-100`` is ignored.

    The sum over targets is divided by ``num_targets`` (default: the targets in this batch), so that
    several batches can be normalised by the token count of their union.
    """
    vocab = logits.shape[-1]
    shifted = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    loss_sum = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), shifted, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    n = int((shifted != IGNORE_INDEX).sum()) if num_targets is None else num_targets
    return loss_sum / max(n, 1)


def labels_from(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Language-modelling labels: the input ids, with padding ignored."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) int64 attention mask of right-padded rows: 1 on the first ``lengths[i]`` positions of row i."""
    return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy over the target tokens
    perplexity: float
    accuracy: float  # next-token accuracy over target tokens (shifted labels)
    tokens: int


@torch.no_grad()
def evaluate_lm(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Loss, perplexity and next-token accuracy of a causal LM over right-padded ``(input_ids, labels,
    lengths)`` batches; ``logits_of(input_ids, attention_mask)`` returns the (B, T, V) logits."""
    loss_sum, correct, tokens = 0.0, 0, 0
    for input_ids, labels, lengths in batches:
        mask = padding_mask(lengths, input_ids.shape[1])
        logits = logits_of(input_ids.to(device), mask.to(device))
        labels = labels.to(device)
        loss_sum += float(causal_lm_loss(logits, labels, num_targets=1))
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        correct += int(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
        tokens += int(valid.sum())
    loss = loss_sum / max(tokens, 1)
    return EvalResult(loss, math.exp(min(loss, 50.0)), correct / max(tokens, 1), tokens)
