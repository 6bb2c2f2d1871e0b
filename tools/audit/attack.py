"""The attacker of the privacy audit (see :mod:`splitft.tools.audit`): its settings, the public text it trains on
and the device text it is scored on, the activations it reads, and its inverse model."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import Example, collate, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.calibration import public_text_ids
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.loading import family_of, load_config
from splitft.shared.model.lora import LoraSettings, load_lora_state
from splitft.shared.model.loss import IGNORE_INDEX, padding_mask
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES, decode_tensor, encode_tensor

Progress = Callable[[str], None]
DEVICE_DATA = GSM8K / "train.jsonl"


@dataclass(frozen=True)
class AttackSettings:
    """Sizes of the audit; the defaults run in seconds per cut on two CPU cores."""

    public_tokens: int = 32768  # attacker's training tokens of public text (half WikiText-2, half E2E)
    eval_tokens: int = 4096  # held-out device tokens (GSM8K train prompts + answers) it is scored on
    steps: int = 400  # optimizer steps of the inverse model
    batch_size: int = 256  # token positions per step
    width: int = 512  # hidden width of the inverse MLP
    window: int = 1  # neighbouring positions on each side the attacker also reads
    lr: float = 2e-3
    negatives: int = 1024  # random tokens in each step's sampled softmax
    seq_len: int = 64  # public text is cut into windows of this many tokens
    max_length: int = 128  # device examples are truncated to this many tokens
    seed: int = 0
    wire_dtype: str = "fp16"  # the activations as the wire carries them (the job's wire_dtype)
    exact_tokens: int = 256  # device tokens (whole sequences from the first) the exact search runs on; 0 = off
    proposals: int = 0  # the exact search's candidates per position: 0 = the whole vocabulary, k = the inverse's top k

    def __post_init__(self) -> None:
        for name in (
            "public_tokens",
            "eval_tokens",
            "steps",
            "batch_size",
            "width",
            "negatives",
            "seq_len",
            "max_length",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"audit.{name} must be a positive integer, got {value!r}")
        if type(self.window) is not int or not 0 <= self.window <= 8:
            raise ConfigError(f"audit.window must be an integer in 0..8, got {self.window!r}")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ConfigError(f"audit.lr must be in (0, 1), got {self.lr!r}")
        if self.seq_len < 2 or self.max_length < 2:
            raise ConfigError("audit.seq_len and audit.max_length must be at least 2")
        for name in ("exact_tokens", "proposals"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"audit.{name} must be an integer >= 0, got {value!r}")
        if self.wire_dtype not in FLOAT_WIRE_DTYPES:
            raise ConfigError(f"audit.wire_dtype must be one of {sorted(FLOAT_WIRE_DTYPES)}, got {self.wire_dtype!r}")


@dataclass(frozen=True)
class DefenseCase:
    """One defense configuration to attack.

    ``clip_quantile`` calibrates the clip per cut: it replaces ``settings.clip`` with that quantile of
    the token norms of public activations at the cut (what a device would calibrate; the attacker
    knows it from the job). ``adapters`` are the client's LoRA weights by saved name (default: the
    base, as before the first round); a NoPeek defense acts only through adapters trained with it. With
    ``knows_adapters`` false (private adapters) the attacker runs the public base where the device runs them.
    """

    name: str
    settings: DefenseSettings = field(default_factory=DefenseSettings)
    clip_quantile: float | None = None
    adapters: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    # False: the adapters are private (sealed with the fleet key): the attacker completes the client segment from
    # the public base instead, and trains and searches with it
    knows_adapters: bool = True
    # a trained information bottleneck the device sends through (tools/audit/bottleneck.py); the attacker knows
    # its weights (they travel with the adapters) but not its noise
    bottleneck: nn.Module | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.clip_quantile is not None and not 0 < self.clip_quantile <= 1:
            raise ConfigError(f"clip_quantile must be in (0, 1], got {self.clip_quantile!r}")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded sequences: ``ids`` (N, T), ``mask`` (N, T), ``targets`` (N, T) the label each
    position predicts (the next token, IGNORE_INDEX where none or not a training target)."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor


def public_tokens(tokenizer: PreTrainedTokenizerBase, tokens: int, seq_len: int) -> TokenBatch:
    """About ``tokens`` tokens of public text in windows of ``seq_len``: half WikiText-2, half E2E."""
    ids = public_text_ids(tokenizer, tokens, seq_len)  # (N, seq_len)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    return TokenBatch(ids, torch.ones_like(ids), targets)


def device_examples(tokenizer: PreTrainedTokenizerBase, tokens: int, max_length: int, offset: int = 0) -> list[Example]:
    """GSM8K training examples (the device's data) from record ``offset`` on, about ``tokens`` tokens."""
    records = load_records(DEVICE_DATA)[offset:]
    examples = tokenize(records[: max(4, tokens // 32)], tokenizer, max_length)
    picked, total = [], 0
    for example in examples:
        if total >= tokens:
            break
        picked.append(example)
        total += len(example.input_ids)
    return picked


def device_tokens(examples: Sequence[Example], pad_id: int) -> TokenBatch:
    ids, labels, lengths = collate(examples, pad_id)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # the device's own loss targets: the answer and its EOS
    return TokenBatch(ids, padding_mask(lengths, ids.shape[1]), targets)


def attack_tokens(source: str | Path, settings: AttackSettings) -> tuple[TokenBatch, TokenBatch]:
    """(the public text the attacker trains on, the held-out device text it is scored on), tokenised."""
    tokenizer = load_tokenizer(source)
    public = public_tokens(tokenizer, settings.public_tokens, settings.seq_len)
    device = device_tokens(
        device_examples(tokenizer, settings.eval_tokens, settings.max_length), tokenizer.pad_token_id
    )
    return public, device


# --------------------------------------------------------------------------- activations


@torch.no_grad()
def block_outputs(
    segment: Segment, data: TokenBatch, depths: Sequence[int], batch: int = 16
) -> dict[int, torch.Tensor]:
    """Hidden states (N, T, C) entering block ``d`` (the output of block ``d - 1``) for each depth ``d``."""
    layers = cast(nn.ModuleList, segment.hf_model.get_submodule(segment.family.layers))
    captured: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    hooks = [
        layers[d - 1].register_forward_hook(lambda _m, _i, out, d=d: captured[d].append(out.detach())) for d in depths
    ]
    try:
        for start in range(0, len(data.ids), batch):
            segment(data.ids[start : start + batch], data.mask[start : start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return {d: torch.cat(parts) for d, parts in captured.items()}


def on_the_wire(hidden: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """``hidden`` as the server decodes it from the wire (fp16, bf16, int8 or fp32), in fp32."""
    return decode_tensor(encode_tensor(hidden, wire_dtype), allow_nonfinite=True)


def adapter_ranks(adapters: Mapping[str, torch.Tensor], layers_path: str, blocks: int, default: int) -> dict[int, int]:
    """The LoRA rank of each block in an adapter state (from its ``lora_A`` shapes)."""
    ranks = dict.fromkeys(range(blocks), default)
    pattern = re.compile(rf"{re.escape(layers_path)}\.(\d+)\..*lora_A")
    for name, value in adapters.items():
        match = pattern.search(name)
        if match and int(match.group(1)) < blocks:
            ranks[int(match.group(1))] = int(value.shape[0])
    return ranks


def client_segment(source: str | Path, cut: int, adapters: Mapping[str, torch.Tensor] | None = None) -> Segment:
    """The client segment of ``cut`` with ``adapters`` loaded (default: the base, zero-B adapters)."""
    if adapters is None:
        return build_segment(source, SegmentSpec.client(cut))
    ranks = adapter_ranks(adapters, family_of(load_config(source)).layers, cut, LoraSettings().r)
    segment = build_segment(source, SegmentSpec.client(cut), ranks=ranks)
    held = segment.lora_parameters()
    load_lora_state(segment.peft_model, {n: v for n, v in adapters.items() if n in held}, strict=False)
    return segment


# --------------------------------------------------------------------------- the inverse model


class Inverter(nn.Module):
    """Features (n, K * C) of K activation vectors -> token logits (n, V), read out through the model's
    embedding E (V, C): ``logits = tau * (linear(x) + mlp(x)) @ E^T + b``, with x centred and each of
    its K vectors scaled to unit RMS. ``prior`` starts the linear path as ``coefficient * identity``
    on the vectors it names: the attacker's prior that a shallow activation lies close to its token's
    embedding (+1), or that the loss gradient at the top points away from the label's (-1)."""

    mean: torch.Tensor
    scale: torch.Tensor
    embedding: torch.Tensor

    def __init__(self, features: torch.Tensor, embedding: torch.Tensor, width: int, prior: Mapping[int, float]) -> None:
        super().__init__()
        dim = embedding.shape[1]
        parts = features.shape[1] // dim
        centred = features - features.mean(0)
        scale = centred.view(len(features), parts, dim).pow(2).mean((0, 2)).sqrt().clamp_min(1e-8)  # (K,)
        self.register_buffer("mean", features.mean(0))  # (K * C,)
        self.register_buffer("scale", scale.repeat_interleave(dim))  # (K * C,)
        embedding = embedding.detach().float()
        self.register_buffer("embedding", embedding / embedding.pow(2).mean().sqrt())  # (V, C), frozen
        self.linear = nn.Linear(parts * dim, dim, bias=False)
        out = nn.Linear(width, dim)
        self.mlp = nn.Sequential(nn.Linear(parts * dim, width), nn.GELU(), out)
        with torch.no_grad():
            self.linear.weight.zero_()
            for part, coefficient in prior.items():
                self.linear.weight[:, part * dim : (part + 1) * dim] = coefficient * torch.eye(dim)
            out.weight.zero_()  # the MLP starts as a no-op on top of the prior
        self.log_tau = nn.Parameter(torch.tensor(-0.5 * math.log(dim)))
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))

    def forward(self, features: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, V), or (n, len(candidates)) over those token ids only."""
        x = (features - self.mean) / self.scale
        z = self.linear(x) + self.mlp(x)  # (n, C)
        emb, bias = (
            (self.embedding, self.bias) if candidates is None else (self.embedding[candidates], self.bias[candidates])
        )
        return self.log_tau.exp() * z @ emb.T + bias


def windowed(hidden: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """(N, T, C) -> (N, T, (2w+1) C): each position with its ``window`` neighbours each side (zeros
    beyond the sequence and on padding)."""
    hidden = hidden * mask.unsqueeze(-1)
    padded = F.pad(hidden, (0, 0, window, window))  # (N, T + 2w, C)
    length = hidden.shape[1]
    return torch.cat([padded[:, o : o + length] for o in range(2 * window + 1)], dim=-1)


def train_attack(
    features: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    targets: torch.Tensor,
    embedding: torch.Tensor,
    settings: AttackSettings,
    prior: Mapping[int, float] | None = None,
) -> Inverter:
    """Train an :class:`Inverter` to predict ``targets`` (n,); ``features(rows, generator)`` gives the
    (len(rows), F) features of those training rows (drawing fresh noise, for a noised defense).

    Each step's softmax runs over the batch's targets and ``settings.negatives`` random tokens (a
    sampled softmax: the full vocabulary would cost most of the time on a CPU); recovery is scored
    over the whole vocabulary.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    vocab = embedding.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = Inverter(features(torch.arange(min(len(targets), 4096)), gen), embedding, settings.width, prior or {})
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    for step in range(settings.steps):
        rows = torch.randint(len(targets), (settings.batch_size,), generator=gen)
        y = targets[rows]
        candidates, y = torch.unique(
            torch.cat([y, torch.randint(vocab, (settings.negatives,), generator=gen)]), return_inverse=True
        )
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = settings.lr * (0.55 + 0.45 * math.cos(math.pi * step / settings.steps))
        loss = F.cross_entropy(model(features(rows, gen), candidates), y[: len(rows)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def recovery(model: Inverter, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (features, tokens) over the whole vocabulary."""
    correct = sum(int((model(x[i : i + 1024]).argmax(-1) == y[i : i + 1024]).sum()) for i in range(0, len(x), 1024))
    return correct / max(len(y), 1)


def rows_of(x: torch.Tensor) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    return lambda rows, _gen: x[rows]


def weight_of(segment: Segment, path: str) -> torch.Tensor:
    return cast(torch.Tensor, segment.hf_model.get_submodule(path).weight)


def frequency_baseline(train_y: torch.Tensor, eval_y: torch.Tensor) -> float:
    return float((eval_y == torch.bincount(train_y).argmax()).float().mean())
