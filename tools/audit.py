"""The privacy audit: how much of a device's text the server can read back from what it receives.

The attacker is the server itself. It knows the frozen base model (public) and the client's LoRA
adapters (it aggregates them), so it can run the client segment on PUBLIC text (the vendored
WikiText-2 and E2E text) and train an inverse model from the activations at the cut to the tokens.
The audit reports that model's top-1 token recovery on held-out device-like data it never trained
on (GSM8K training prompts and answers), padding excluded, next to a frequency baseline (always
guessing the public text's most common token).

The inverse model (:class:`Inverter`) is an MLP over the activations of a token and ``window``
neighbours on each side, standardised, whose output is read out through the model's own token
embedding (the attacker knows it): logits = MLP(features) @ E^T + b, over the whole vocabulary, so
tokens absent from the public text can still be recovered. Against a defended device the attacker
trains on defended public activations (an adaptive attacker who knows the job's defense settings),
with fresh noise every batch.

The label audit covers the U-shaped split's top cut: the device holds the last ``k`` blocks, the
final norm and the head, receives the hidden states at ``L - k`` and sends back the gradient of its
loss w.r.t. them. The attacker trains on (hidden, gradient) pairs of public text to predict the
label (the next token) and is scored on the device's targets (GSM8K answers), next to an attacker
that sees the hidden state alone: it runs the tail itself (it knows its weights) and takes the
model's own top-1 next-token guess.

Everything is seeded: the same settings give the same numbers on the same machine and thread count.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import Batches, Example, collate, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.defense import DefenseSettings, defend, nopeek_loss
from splitft.shared.model.loading import family_of, hidden_size, load_config, num_layers
from splitft.shared.model.lora import LoraSettings, load_lora_state
from splitft.shared.model.loss import IGNORE_INDEX, EvalResult, TargetLoss, causal_lm_loss, evaluate_lm, padding_mask
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.model.tokenizer import DATASETS, GSM8K, load_tokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
PUBLIC_TEXTS = (DATASETS / "wikitext-2" / "test.txt.gz", DATASETS / "e2e" / "valid.txt.gz")
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


@dataclass(frozen=True)
class DefenseCase:
    """One defense configuration to attack.

    ``clip_quantile`` calibrates the clip per cut: it replaces ``settings.clip`` with that quantile of
    the token norms of public activations at the cut (what a device would calibrate; the attacker
    knows it from the job). ``adapters`` are the client's LoRA weights by saved name (default: the
    base, as before the first round); a NoPeek defense acts only through adapters trained with it.
    """

    name: str
    settings: DefenseSettings = field(default_factory=DefenseSettings)
    clip_quantile: float | None = None
    adapters: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.clip_quantile is not None and not 0 < self.clip_quantile <= 1:
            raise ConfigError(f"clip_quantile must be in (0, 1], got {self.clip_quantile!r}")


@dataclass(frozen=True)
class CutResult:
    """Token recovery at one cut under one defense."""

    cut: int
    defense: str
    recovery: float  # top-1 token recovery on the held-out device tokens
    baseline: float  # the frequency guess's rate on the same tokens
    clip: float | None  # the clip in force (after calibration)
    noise_std: float  # per-coordinate noise standard deviation in force
    eval_tokens: int
    coverage: float  # share of the device tokens that occur in the attacker's public text at all


@dataclass(frozen=True)
class LabelResult:
    """Label recovery from the U-shaped split's top cut with ``tail`` blocks on the device."""

    tail: int
    depth: int  # the server sees the hidden states entering block ``depth`` (= L - tail)
    recovery: float  # from (hidden, gradient)
    hidden_only: float  # the model's own top-1 guess from the hidden state (no gradient needed)
    baseline: float
    eval_tokens: int


@dataclass
class AuditReport:
    model: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    settings: AttackSettings
    inversion: list[CutResult]
    labels: list[LabelResult]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


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
    eos = int(tokenizer.eos_token_id)
    windows = []
    for path in PUBLIC_TEXTS:
        want = math.ceil(tokens / len(PUBLIC_TEXTS) / seq_len) * seq_len
        stream: list[int] = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = line.split("||", 1)[-1].strip()  # E2E lines are "meaning representation||text"
                if text and not text.startswith("="):  # WikiText headings are "= = Title = ="
                    stream += [*tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], eos]
                if len(stream) >= want:
                    break
        windows.append(torch.tensor(stream[:want], dtype=torch.int64).view(-1, seq_len))
    ids = torch.cat(windows)  # (N, seq_len)
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


def _windowed(hidden: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
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


def _rows_of(x: torch.Tensor) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    return lambda rows, _gen: x[rows]


def _weight(segment: Segment, path: str) -> torch.Tensor:
    return cast(torch.Tensor, segment.hf_model.get_submodule(path).weight)


def _baseline(train_y: torch.Tensor, eval_y: torch.Tensor) -> float:
    return float((eval_y == torch.bincount(train_y).argmax()).float().mean())


# --------------------------------------------------------------------------- input inversion


def attack_tokens(source: str | Path, settings: AttackSettings) -> tuple[TokenBatch, TokenBatch]:
    """(the public text the attacker trains on, the held-out device text it is scored on), tokenised."""
    tokenizer = load_tokenizer(source)
    public = public_tokens(tokenizer, settings.public_tokens, settings.seq_len)
    device = device_tokens(
        device_examples(tokenizer, settings.eval_tokens, settings.max_length), tokenizer.pad_token_id
    )
    return public, device


def audit_inversion(
    source: str | Path,
    cuts: Sequence[int],
    cases: Sequence[DefenseCase] = (DefenseCase("none"),),
    settings: AttackSettings = AttackSettings(),
    progress: Progress | None = None,
) -> list[CutResult]:
    """Token recovery at each cut under each defense case (rows ordered case by case, cut by cut)."""
    config = load_config(source)
    total = num_layers(config)
    if not cuts or any(not 1 <= c <= total - 1 for c in cuts):
        raise ConfigError(f"cuts must be in 1..{total - 1}, got {list(cuts)}")
    public, device = attack_tokens(source, settings)
    results = []
    cache: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
    for case in cases:
        if id(case.adapters) not in cache:  # cases with the same adapters see the same activations
            segment = client_segment(source, max(cuts), case.adapters)
            embedding = _weight(segment, segment.family.embeddings[0])  # (V, C)
            cache = {
                id(case.adapters): (
                    embedding,
                    block_outputs(segment, public, cuts),
                    block_outputs(segment, device, cuts),
                )
            }
        embedding, pub_h, dev_h = cache[id(case.adapters)]
        for cut in cuts:
            row = _attack_cut(cut, case, pub_h[cut], dev_h[cut], public, device, embedding, settings)
            log.info("cut %d, %s: recovery %.3f", cut, case.name, row.recovery)
            if progress:
                progress(
                    f"inversion cut {cut} [{case.name}]: recovery {row.recovery:.1%} (baseline {row.baseline:.1%})"
                )
            results.append(row)
    return results


def _attack_cut(
    cut: int,
    case: DefenseCase,
    pub_h: torch.Tensor,
    dev_h: torch.Tensor,
    public: TokenBatch,
    device: TokenBatch,
    embedding: torch.Tensor,
    settings: AttackSettings,
) -> CutResult:
    defense = case.settings
    if case.clip_quantile is not None:
        norms = pub_h.norm(dim=-1)[public.mask.bool()]
        defense = replace(defense, clip=float(torch.quantile(norms, case.clip_quantile)))
    std = defense.noise_std(pub_h.shape[-1])
    # The device's activations, defended once, as sent.
    sent = defend(dev_h, defense, torch.Generator().manual_seed(settings.seed + 1))
    dev_valid = device.mask.bool()
    eval_x = _windowed(sent, device.mask, settings.window)[dev_valid]  # (n, (2w+1) C)
    eval_y = device.ids[dev_valid]
    # The attacker's public activations: clipped here, noised afresh for every batch.
    pub_valid = public.mask.bool()
    train_x = _windowed(defend(pub_h, replace(defense, noise=0.0)), public.mask, settings.window)[pub_valid]
    train_y = public.ids[pub_valid]
    # Neighbours beyond the sequence are zeros (no token) and get no noise, as on the device.
    present = _windowed(torch.ones_like(pub_h), public.mask, settings.window)[pub_valid]

    def features(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = train_x[rows]
        return x + torch.randn(x.shape, generator=gen) * std * present[rows] if std > 0 else x

    model = train_attack(features, train_y, embedding, settings, prior={settings.window: 1.0})
    coverage = float(torch.isin(eval_y, train_y).float().mean())
    return CutResult(
        cut, case.name, recovery(model, eval_x, eval_y), _baseline(train_y, eval_y), defense.clip, std, len(eval_y),
        coverage,
    )  # fmt: skip


# --------------------------------------------------------------------------- label leakage (U-shaped split)


def _tail_gradients(
    segment: Segment, data: TokenBatch, tails: Sequence[int], batch: int = 16
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each tail ``k``: the hidden states (N, T, C) at ``L - k``, the gradient of the device's
    summed next-token loss (its targets only) w.r.t. them, as the device would send it back, and the
    model's own top-1 next-token guesses (N, T) (the server can run the tail: it knows its weights)."""
    total = segment.spec.end
    model = segment.hf_model
    norm, head = model.get_submodule(segment.family.final_norm), model.get_submodule(segment.family.lm_head)
    hidden = block_outputs(segment, data, [total - k for k in tails], batch)
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for k in tails:
        grads, guesses = [], []
        for start in range(0, len(data.ids), batch):
            h = hidden[total - k][start : start + batch].clone().requires_grad_(True)  # (B, T, C)
            mask, targets = data.mask[start : start + batch], data.targets[start : start + batch]
            logits = head(norm(h)) if k == 0 else segment(h, mask, start=total - k)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            grads.append(torch.autograd.grad(loss, h)[0])
            guesses.append(logits.detach().argmax(-1))
        out[k] = (hidden[total - k], torch.cat(grads), torch.cat(guesses))
    return out


def audit_labels(
    source: str | Path,
    tails: Sequence[int] = (0, 1, 2),
    settings: AttackSettings = AttackSettings(),
    progress: Progress | None = None,
) -> list[LabelResult]:
    """Label recovery from (hidden, gradient) at the U-shaped split's top cut, for each tail size ``k``."""
    total = num_layers(load_config(source))
    if not tails or any(not 0 <= k <= total - 1 for k in tails):
        raise ConfigError(f"tails must be in 0..{total - 1}, got {list(tails)}")
    public, device = attack_tokens(source, settings)
    segment = build_segment(source, SegmentSpec.whole(total))
    head = _weight(segment, segment.family.lm_head)  # (V, C): the attacker knows it
    pub, dev = _tail_gradients(segment, public, tails), _tail_gradients(segment, device, tails)
    pub_valid, dev_valid = public.targets != IGNORE_INDEX, device.targets != IGNORE_INDEX
    train_y, eval_y = public.targets[pub_valid], device.targets[dev_valid]
    results = []
    for k in tails:
        hidden, grad, guess = pub[k]
        train_x = torch.cat([hidden[pub_valid], grad[pub_valid]], dim=-1)  # (n, 2C)
        model = train_attack(_rows_of(train_x), train_y, head, settings, prior={1: -1.0})
        hidden, grad, guess = dev[k]
        rate = recovery(model, torch.cat([hidden[dev_valid], grad[dev_valid]], dim=-1), eval_y)
        own = float((guess[dev_valid] == eval_y).float().mean())
        row = LabelResult(k, total - k, rate, own, _baseline(train_y, eval_y), len(eval_y))
        if progress:
            progress(f"labels tail {k}: from hidden+gradient {row.recovery:.1%}, model's own guess {own:.1%}")
        results.append(row)
    return results


# --------------------------------------------------------------------------- training with a defense


def finetune_split(
    source: str | Path,
    cut: int,
    defense: DefenseSettings,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    lora: LoraSettings | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[Segment, Segment]:
    """LoRA fine-tuning through the split in one process: client -> :func:`defend` -> server, with
    the NoPeek term added to the loss when set. Returns the trained (client, server) segments.

    End-to-end autograd through ``defend`` gives the gradients the split's wire would carry.
    """
    total = num_layers(load_config(source))
    client = build_segment(source, SegmentSpec.client(cut), lora=lora, lora_seed=seed)
    server = build_segment(source, SegmentSpec.server(cut, total), lora=lora, lora_seed=seed)
    params = [*client.lora_parameters().values(), *server.lora_parameters().values()]
    opt = torch.optim.AdamW(params, lr=lr)
    pad = int(load_tokenizer(source).pad_token_id)
    batches, gen = Batches(examples, batch_size, pad, seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids, labels, lengths = batches.next()
        mask = padding_mask(lengths, ids.shape[1])
        hidden = client(ids, mask)  # (B, T, C)
        loss = causal_lm_loss(server(defend(hidden, defense, gen), mask), labels)
        if defense.nopeek > 0:
            loss = loss + nopeek_loss(ids, hidden, mask, defense.nopeek, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % 25 == 0:
            progress(
                f"finetune cut {cut} [{defense.describe()}]: step {step + 1}/{steps}, loss {float(loss.detach()):.3f}"
            )
    return client, server


def evaluate_split(
    client: Segment, server: Segment, defense: DefenseSettings, examples: Sequence[Example], pad_id: int, seed: int = 1
) -> EvalResult:
    """Eval loss and perplexity of the split with the device's defense applied (as deployed)."""
    gen = torch.Generator().manual_seed(seed)

    def loss_of(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> TargetLoss:
        return server.target_loss(defend(client(ids, mask), defense, gen), mask, labels)

    batches = [collate(examples[i : i + 16], pad_id) for i in range(0, len(examples), 16)]
    return evaluate_lm(loss_of, batches)


# --------------------------------------------------------------------------- the whole audit and its report


def parse_cuts(text: str, total: int) -> list[int]:
    """``"all"`` -> 1..L-1; ``"1,2,5"`` -> [1, 2, 5] (each in 1..L-1)."""
    if text.strip() == "all":
        return list(range(1, total))
    try:
        cuts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise ConfigError(f"cuts must be 'all' or comma-separated integers, got {text!r}") from exc
    if not cuts or any(not 1 <= c <= total - 1 for c in cuts):
        raise ConfigError(f"cuts must be in 1..{total - 1}, got {text!r}")
    return cuts


def run_audit(
    source: str | Path,
    cuts: Sequence[int] | None = None,
    cases: Sequence[DefenseCase] = (DefenseCase("none"),),
    tails: Sequence[int] = (0, 1, 2),
    settings: AttackSettings = AttackSettings(),
    progress: Progress | None = None,
) -> AuditReport:
    """Input inversion at ``cuts`` (default 1..L-1) under each case, and label leakage for ``tails``."""
    config = load_config(source)
    total = num_layers(config)
    cuts = list(range(1, total)) if cuts is None else list(cuts)
    inversion = audit_inversion(source, cuts, cases, settings, progress)
    labels = audit_labels(source, tails, settings, progress) if tails else []
    vocab = int(config.vocab_size)
    return AuditReport(str(source), total, hidden_size(config), vocab, settings, inversion, labels)


def markdown(report: AuditReport) -> str:
    """The audit's tables: recovery per cut (one column per defense) and label leakage per tail."""
    names = list(dict.fromkeys(r.defense for r in report.inversion))
    cuts = sorted({r.cut for r in report.inversion})
    by = {(r.defense, r.cut): r for r in report.inversion}
    lines = [
        "| cut | baseline | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for cut in cuts:
        base = next(r.baseline for r in report.inversion if r.cut == cut)
        cells = [f"{by[(n, cut)].recovery:.1%}" if (n, cut) in by else "-" for n in names]
        lines.append(f"| {cut} | {base:.1%} | " + " | ".join(cells) + " |")
    if report.labels:
        lines += [
            "",
            "| device tail k | server sees block | labels from hidden + gradient | model's own guess (hidden alone) | baseline |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.tail} | {r.depth} | {r.recovery:.1%} | {r.hidden_only:.1%} | {r.baseline:.1%} |"
            for r in report.labels
        ]
    return "\n".join(lines)


def write_report(report: AuditReport, out: Path) -> dict[str, Path]:
    """``audit.md`` (the tables), ``audit.json`` (every number and setting), ``audit.png`` (recovery vs cut)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "audit.md", "json": out / "audit.json", "plot": out / "audit.png"}
    paths["table"].write_text(markdown(report) + "\n")
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    plot_recovery(report, paths["plot"])
    return paths


def plot_recovery(report: AuditReport, path: Path) -> None:
    """Recovery vs cut, one line per defense, the frequency baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r.defense for r in report.inversion):
        rows = sorted((r for r in report.inversion if r.defense == name), key=lambda r: r.cut)
        ax.plot([r.cut for r in rows], [r.recovery for r in rows], marker="o", label=name)
    base = sorted({(r.cut, r.baseline) for r in report.inversion})
    ax.plot([c for c, _ in base], [b for _, b in base], "k--", label="frequency baseline")
    ax.set(xlabel="cut layer c", ylabel="top-1 token recovery (held-out GSM8K)", ylim=(0, 1.02))
    ax.set_title(f"Inversion of the activations at the cut: {Path(report.model).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
