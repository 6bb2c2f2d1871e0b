"""Losses of a causal LM: next-token cross-entropy over target positions, and evaluation over batches.

The LM head of a real model is its largest tensor product: ``(N, C) x (C, V)`` for ``N`` target positions
and a vocabulary of ``V`` (151,936 for Qwen2.5). :func:`linear_cross_entropy` runs the head and the loss
over a few rows at a time and computes the gradient of those rows as it goes, so no ``(N, V)`` logits
tensor (nor its gradient) is ever alive: at most :data:`HEAD_CHUNK_BYTES` of fp32 logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

#: The fp32 logits the chunked head holds at once (rows x vocabulary x 4 bytes): 220 rows of a 151,936-token
#: vocabulary. Each chunk reads the whole head weight again, so fewer, larger chunks are faster: at this size
#: the head takes 1.0-1.1x the time of the whole logits (scripts/bench_memory.py, "The head alone").
HEAD_CHUNK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class TargetLoss:
    loss_sum: torch.Tensor  # summed cross-entropy over the batch's targets (a scalar with its graph)
    tokens: int  # the targets
    correct: int  # targets predicted right (argmax)


def head_rows(vocab: int, budget: int = HEAD_CHUNK_BYTES) -> int:
    """Target positions per chunk of the head: as many as ``budget`` bytes of fp32 logits hold."""
    return max(1, budget // (4 * max(vocab, 1)))


def linear_cross_entropy(
    x: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of ``head(x)`` (``x``: ``(N, C)``, the final norm's output at the target
    positions) against ``targets`` (``(N,)``), and how many targets the argmax predicts.

    Equal to ``F.cross_entropy(head(x).float(), targets, reduction="sum")`` and its gradient with respect to
    ``x``, computed ``rows`` positions at a time (default: :func:`head_rows`). The head is frozen (its weight
    gets no gradient): when ``x`` needs a gradient, each chunk's is computed in the forward pass from the
    chunk's softmax (``softmax - onehot`` times the weight), so the backward pass is one multiplication and
    the head runs once. Logits and the loss are fp32 whatever the weights' dtype.
    """
    if head.weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the head's weight: freeze it")
    rows = rows or head_rows(head.out_features)
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    loss, correct = _LinearCrossEntropy.apply(x, head.weight, head.bias, targets, rows, wants_grad)
    return loss, int(correct)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: int,
        wants_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Summed in float64 over the chunks (one rounding to fp32 at the end, as one cross-entropy call has).
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        grad = torch.empty_like(x) if wants_grad else None  # (N, C)
        for i in range(0, x.shape[0], rows):
            wanted = targets[i : i + rows]  # (n,)
            logits = F.linear(x[i : i + rows], weight, bias).float()  # (n, V)
            top, guess = logits.max(dim=-1)  # (n,): the largest logit, for a stable exponent, and the argmax
            picked = logits.gather(1, wanted.unsqueeze(1)).squeeze(1)  # (n,)
            correct += (guess == wanted).sum()
            exps = logits.sub_(top.unsqueeze(1)).exp_()  # in the logits' memory, as every step below
            sums = exps.sum(dim=-1)  # (n,)
            total += (top + sums.log() - picked).sum(dtype=torch.float64)  # log-sum-exp minus the target's logit
            if grad is not None:
                probs = exps.div_(sums.unsqueeze(1))  # the softmax
                probs[torch.arange(wanted.numel(), device=x.device), wanted] -= 1.0
                grad[i : i + rows] = probs.to(weight.dtype) @ weight  # (n, C)
        ctx.save_for_backward(grad if grad is not None else x.new_empty(0))
        ctx.mark_non_differentiable(correct)
        return total.float(), correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(grad.dtype), None, None, None, None, None


def logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> TargetLoss:
    """The summed next-token loss and correct predictions of full ``(B, T, V)`` logits (a Hugging Face
    model's output) against ``labels`` ``(B, T)``."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    loss_sum = causal_lm_loss(logits, labels, num_targets=1)
    correct = int(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
    return TargetLoss(loss_sum, int(valid.sum()), correct)


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
    loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], TargetLoss],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Loss, perplexity and next-token accuracy of a causal LM over right-padded ``(input_ids, labels,
    lengths)`` batches; ``loss_of(input_ids, attention_mask, labels)`` gives a batch's summed loss
    (:meth:`Segment.target_loss`, or :func:`logits_loss` of a model's logits)."""
    loss_sum, correct, tokens = 0.0, 0, 0
    for input_ids, labels, lengths in batches:
        mask = padding_mask(lengths, input_ids.shape[1])
        result = loss_of(input_ids.to(device), mask.to(device), labels.to(device))
        loss_sum += float(result.loss_sum)
        correct += result.correct
        tokens += result.tokens
    loss = loss_sum / max(tokens, 1)
    return EvalResult(loss, math.exp(min(loss, 50.0)), correct / max(tokens, 1), tokens)
