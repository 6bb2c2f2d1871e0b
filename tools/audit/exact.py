"""The exact-search attacker of the privacy audit (see :mod:`splitft.tools.audit`).

The server knows the frozen base and, unless they are kept from it, the client adapters: it can run
the client segment itself. In a causal LM the activation a device sends for position ``t`` depends on
tokens ``0..t`` only, so the server recovers the tokens one position at a time: with the tokens
``0..t-1`` already recovered, it runs the segment on every candidate for token ``t`` (the whole
vocabulary, or the learned inverse's top ``k``), applies what it knows of the device's defense (the
clip; not the noise, which it cannot know) and keeps the candidate whose activation is nearest, in
L2, to the one it received. Against Gaussian noise the nearest candidate is the most likely one.

A candidate costs one new position, not a new sequence: a chunk of candidates runs as one sequence, the
recovered prefix followed by the candidates, under an attention mask that lets each candidate see the
prefix and itself only; the prefix's keys and values are computed once per chunk and shared by all its
candidates, so a position costs about one pass of the client blocks over the vocabulary (plus the
candidates' attention to the prefix), whatever its depth in the sequence.

Against noise the distances are whitened (divided by the noise's spread on each coordinate, a
:class:`Channel`), so the nearest candidate is the most likely one for a learned, uneven noise too; the
learned inverse's proposals are kept only when the nearest of them is as near as the true token would be
(the whitened distance of the true token is chi-squared with C degrees of freedom: at most C + 4 sqrt(2C)),
else the whole vocabulary is searched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from splitft.shared.model.defense import DefenseSettings, clip_tokens
from splitft.shared.model.loss import IGNORE_INDEX
from splitft.shared.model.split import Segment
from splitft.tools.audit.attack import Progress, TokenBatch


@dataclass(frozen=True)
class Channel:
    """What the server knows of the way from a device's activation to what it receives.

    A candidate activation ``h`` (N, C) would be received as ``gain * clip(h)`` plus Gaussian noise of standard
    deviation ``std`` on each coordinate (a number, or one per coordinate (C,)); ``gain`` None is 1.
    """

    clip: float | None = None
    gain: torch.Tensor | None = None
    std: torch.Tensor | float = 0.0
    # compare directions (unit vectors), not the vectors: the match of a server whose copy of the client segment
    # may be off by a scale (private adapters: it runs the public base, which the device's adapters may scale)
    direction: bool = False

    @classmethod
    def of(cls, defense: DefenseSettings | None, width: int) -> Channel:
        """The channel of a device's clip and noise (:func:`~splitft.shared.model.defense.defend`)."""
        return cls() if defense is None else cls(defense.clip, None, defense.noise_std(width))

    @property
    def noisy(self) -> bool:
        return bool(torch.as_tensor(self.std).gt(0).any())

    def expected(self, hidden: torch.Tensor) -> torch.Tensor:
        """What ``hidden`` (N, C) is received as, before the noise."""
        if self.clip is not None:
            hidden = clip_tokens(hidden, self.clip)
        return hidden if self.gain is None else hidden * self.gain.to(hidden)

    def distance(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N,) squared distances of the candidates ``hidden`` (N, C) to the received ``target`` (C,), whitened;
        with ``direction``, of their unit vectors (times the target's squared norm, for the same rounding bound)."""
        expected = self.expected(hidden)
        if self.direction:
            scale = target.norm()
            return (
                (F.normalize(expected, dim=-1) * scale - target).pow(2).sum(-1) if scale > 0 else expected.sum(-1) * 0
            )
        diff = expected - target
        if self.noisy:
            diff = diff / torch.as_tensor(self.std).to(diff).clamp_min(1e-12)
        return diff.pow(2).sum(-1)


def candidate_step(segment: Segment, cut: int, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Activations (N, C) at the cut of the candidates ``ids`` (N,), each as the token after ``prefix`` (t,).

    One sequence, the prefix then the N candidates, all candidates at position t; the attention mask lets
    the prefix attend causally to itself and each candidate to the prefix and itself only, so each
    candidate's activation is the one it would have as token t, and the prefix's keys and values are
    computed once for the whole chunk.
    """
    model, family = segment.hf_model, segment.family
    t, count = len(prefix), len(ids)
    device = ids.device
    tokens = torch.cat([prefix.to(device), ids]).unsqueeze(0)  # (1, t + N)
    positions = torch.cat([torch.arange(t, device=device), torch.full((count,), t, device=device)]).unsqueeze(0)
    allowed = torch.zeros(t + count, t + count, dtype=torch.bool, device=device)
    allowed[:t, :t] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    allowed[t:, :t] = True
    allowed[t:, t:] = torch.eye(count, dtype=torch.bool, device=device)
    layers = cast(nn.ModuleList, model.get_submodule(family.layers))
    with segment.autocast():
        hidden = family.embed(model, tokens, positions)  # (1, t + N, C)
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]  # (1, 1, t + N, t + N), additive
        extra: dict[str, object] = {"position_ids": positions}
        for path in family.shared:  # rotary embeddings
            extra["position_embeddings"] = model.get_submodule(path)(hidden, position_ids=positions)
        for i in range(cut):
            hidden = layers[i](hidden, attention_mask=mask, **extra)
    return hidden[0, t:].float()


def _candidate_sets(vocab: int, proposed: torch.Tensor | None) -> list[torch.Tensor]:
    """The candidates to try in turn: the proposals, then the rest of the vocabulary (or the whole of it)."""
    everything = torch.arange(vocab)
    if proposed is None:
        return [everything]
    first = torch.unique(proposed.long().clamp(0, vocab - 1))
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[first] = False
    return [first, everything[keep]]


@torch.no_grad()
def exact_search(
    segment: Segment,
    cut: int,
    sent: torch.Tensor,
    channel: Channel | None = None,
    proposals: torch.Tensor | None = None,
    chunk: int = 512,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Recover the tokens (T,) of one sequence from its activations at ``cut`` as sent, ``sent`` (T, C).

    ``segment`` is the client segment (at least ``cut`` blocks) with the weights the attacker believes the
    device holds; ``channel`` (default: none) is what the attacker knows of the device's defense: the clip and
    gain are applied to every candidate's activation, as the device applies them, and the distances are
    whitened by the noise's spread (the noise itself it cannot know). ``proposals`` (T, K) are the token ids
    tried first at each position (the learned inverse's top ``k``): the nearest of them is kept when it is as
    near as the true token would be (within the wire's rounding without noise; within C + 4 sqrt(2C), the
    true token's chi-squared bound, with noise), else the rest of the vocabulary is searched too; None
    searches the whole vocabulary. Without noise, the search stops at a candidate within the wire's rounding
    of the activation (the token itself). ``progress(t)`` is called after each position.
    """
    vocab = int(segment.config.vocab_size)
    device = segment.device
    target = sent.float().to(device)
    channel = channel or Channel()
    width = target.shape[-1]
    recovered = torch.empty(len(sent), dtype=torch.long)
    for t in range(len(sent)):
        # What the true token's distance may be: the wire's rounding without noise; with noise (whitened), the
        # chi-squared bound of C coordinates. A proposal nearer than that is taken, else the vocabulary is searched.
        rounding = 1e-3 * float(target[t].pow(2).sum())
        accept = width + 4 * (2 * width) ** 0.5 if channel.noisy and not channel.direction else rounding
        best_distance, best_token = float("inf"), -1
        for candidates in _candidate_sets(vocab, None if proposals is None else proposals[t]):
            for start in range(0, len(candidates), chunk):
                ids = candidates[start : start + chunk].to(device)
                distance = channel.distance(candidate_step(segment, cut, recovered[:t], ids), target[t])  # (N,)
                j = int(distance.argmin())
                if float(distance[j]) < best_distance:
                    best_distance, best_token = float(distance[j]), int(ids[j])
                if best_distance <= rounding and not channel.noisy:
                    break  # no noise: a candidate within the wire's rounding is the token
            if best_distance <= accept:
                break
        recovered[t] = best_token
        if progress:
            progress(t)
    return recovered


@dataclass(frozen=True)
class SearchOutcome:
    """The exact search on the first sequences of the device's text."""

    exact: float  # share of the searched tokens recovered
    exact_tokens: int  # tokens searched
    exact_labels: (
        float | None
    )  # share of the device's labels (loss targets) read off the next positions; None: none searched


def search_sequences(
    segment: Segment,
    cut: int,
    sent: torch.Tensor,
    device: TokenBatch,
    channel: Channel,
    tokens: int,
    proposals: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> SearchOutcome:
    """:func:`exact_search` on the device's sequences from the first until ``tokens`` tokens are searched
    (the last one cut short). ``sent`` (N, T, C): the activations at ``cut`` as the server decoded them;
    ``proposals`` (N, T, K) or None (the whole vocabulary).

    A label is the next position's input in a causal LM (``targets[t] = ids[t + 1]``), so the labels the
    attacker reads are the recovered inputs of the next positions, scored where the device has a target.
    """
    lengths = device.mask.sum(1).tolist()
    recovered = correct = labels = labelled = 0
    started = time.monotonic()
    for row, length in enumerate(lengths):
        take = min(int(length), tokens - recovered)
        if take <= 0:
            break
        guess = exact_search(
            segment, cut, sent[row, :take], channel, None if proposals is None else proposals[row, :take]
        )
        truth = device.ids[row, :take]
        correct += int((guess == truth).sum())
        recovered += take
        targets = device.targets[row, : take - 1]  # the labels whose next input was searched
        wanted = targets != IGNORE_INDEX
        labels += int((guess[1:take][wanted] == targets[wanted]).sum())
        labelled += int(wanted.sum())
        if progress:
            progress(
                f"exact search cut {cut}: {recovered}/{tokens} tokens, {correct} recovered "
                f"({time.monotonic() - started:.0f} s)"
            )
    return SearchOutcome(correct / max(recovered, 1), recovered, labels / labelled if labelled else None)
