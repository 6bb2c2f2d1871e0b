"""The audits (see :mod:`splitft.tools.audit`): token recovery at each cut under each defense, label leakage at the
U-shaped split's top cut, fine-tuning through the split with a defense on, and the whole audit."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import Batches, Example, collate
from splitft.shared.model.defense import DefenseSettings, defend, distance_loss, nopeek_loss
from splitft.shared.model.loading import hidden_size, load_config, num_layers
from splitft.shared.model.lora import LoraSettings
from splitft.shared.model.loss import IGNORE_INDEX, EvalResult, TargetLoss, causal_lm_loss, evaluate_lm, padding_mask
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.tools.audit.attack import (
    AttackSettings,
    DefenseCase,
    Progress,
    TokenBatch,
    attack_tokens,
    block_outputs,
    client_segment,
    frequency_baseline,
    on_the_wire,
    recovery,
    rows_of,
    train_attack,
    weight_of,
    windowed,
)
from splitft.tools.audit.bottleneck import Bottleneck
from splitft.tools.audit.exact import Channel, search_sequences

log = logging.getLogger(__name__)

#: the audit's default sizes (frozen: one instance serves every call)
DEFAULT_SETTINGS = AttackSettings()


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
    exact: float | None = None  # the exact search's token recovery on its ``exact_tokens`` (None: not run)
    exact_tokens: int = 0
    exact_labels: float | None = None  # the device's labels read off the next positions' recovered inputs
    exact_seconds: float = 0.0
    # how the exact search that recovered the most matched: "vectors", or "directions" (model completion, where the
    # server's copy of the segment may be off by a scale)
    exact_match: str = "vectors"

    @property
    def best(self) -> tuple[float, str]:
        """The strongest attacker's token recovery, and its name."""
        if self.exact is not None and self.exact >= self.recovery:
            return self.exact, "exact search" if self.exact_match == "vectors" else "exact search by direction"
        return self.recovery, "learned inverse"


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
        data = asdict(self)
        for row, result in zip(cast(list[dict[str, object]], data["inversion"]), self.inversion, strict=True):
            row["best"], row["best_attacker"] = result.best
        return data


# --------------------------------------------------------------------------- input inversion


def audit_inversion(
    source: str | Path,
    cuts: Sequence[int],
    cases: Sequence[DefenseCase] = (DefenseCase("none"),),
    settings: AttackSettings = DEFAULT_SETTINGS,
    progress: Progress | None = None,
) -> list[CutResult]:
    """Token recovery at each cut under each defense case (rows ordered case by case, cut by cut)."""
    config = load_config(source)
    total = num_layers(config)
    if not cuts or any(not 1 <= c <= total - 1 for c in cuts):
        raise ConfigError(f"cuts must be in 1..{total - 1}, got {list(cuts)}")
    public, device = attack_tokens(source, settings)
    results = []
    cache: dict[int, tuple[Segment, dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}

    def seen(
        adapters: Mapping[str, torch.Tensor] | None,
    ) -> tuple[Segment, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """The client segment with ``adapters`` and its activations on public and device text (kept for the next
        cases with the same adapters)."""
        if id(adapters) not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            segment = client_segment(source, max(cuts), adapters)
            segment.eval()
            cache[id(adapters)] = (segment, block_outputs(segment, public, cuts), block_outputs(segment, device, cuts))
        return cache[id(adapters)]

    for case in cases:
        _, _, dev_h = seen(case.adapters)  # what the device sends
        segment, pub_h, _ = seen(case.adapters if case.knows_adapters else None)  # what the attacker runs
        for cut in cuts:
            row = _attack_cut(cut, case, segment, pub_h[cut], dev_h[cut], public, device, settings, progress)
            log.info("cut %d, %s: recovery %.3f, exact %s", cut, case.name, row.recovery, row.exact)
            if progress:
                exact = "" if row.exact is None else f", exact search {row.exact:.1%} of {row.exact_tokens}"
                progress(
                    f"inversion cut {cut} [{case.name}]: learned inverse {row.recovery:.1%}{exact} "
                    f"(baseline {row.baseline:.1%})"
                )
            results.append(row)
    return results


def _attack_cut(
    cut: int,
    case: DefenseCase,
    segment: Segment,
    pub_h: torch.Tensor,
    dev_h: torch.Tensor,
    public: TokenBatch,
    device: TokenBatch,
    settings: AttackSettings,
    progress: Progress | None = None,
) -> CutResult:
    defense = case.settings
    if case.clip_quantile is not None:
        norms = pub_h.norm(dim=-1)[public.mask.bool()]
        defense = replace(defense, clip=float(torch.quantile(norms, case.clip_quantile)))
    width = pub_h.shape[-1]
    gen = torch.Generator().manual_seed(settings.seed + 1)
    bottleneck = cast(Bottleneck | None, case.bottleneck)
    # The device's activations, defended once, as sent and as the wire carries them; what the server knows of it.
    if bottleneck is None:
        channel = Channel.of(defense, width)
        sent = on_the_wire(defend(dev_h, defense, gen), settings.wire_dtype)
    else:
        if defense.noise > 0:
            raise ConfigError("an audit case has either noise or a bottleneck, not both")
        channel = bottleneck.channel(defense.clip)
        with torch.no_grad():
            sent = on_the_wire(bottleneck(defend(dev_h, defense), gen)[0], settings.wire_dtype)
    std = torch.as_tensor(channel.std, dtype=torch.float32).expand(width)  # (C,) per coordinate
    dev_valid = device.mask.bool()
    eval_x = windowed(sent, device.mask, settings.window)[dev_valid]  # (n, (2w+1) C)
    eval_y = device.ids[dev_valid]
    # The attacker's public activations as received without the noise; noised afresh for every batch.
    pub_valid = public.mask.bool()
    train_x = windowed(channel.expected(pub_h), public.mask, settings.window)[pub_valid]
    train_y = public.ids[pub_valid]
    # Neighbours beyond the sequence are zeros (no token) and get no noise, as on the device.
    present = windowed(torch.ones_like(pub_h) * std, public.mask, settings.window)[pub_valid]

    def features(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = train_x[rows]
        return x + torch.randn(x.shape, generator=gen) * present[rows] if channel.noisy else x

    embedding = weight_of(segment, segment.family.embeddings[0])  # (V, C)
    model = train_attack(features, train_y, embedding, settings, prior={settings.window: 1.0})
    coverage = float(torch.isin(eval_y, train_y).float().mean())
    row = CutResult(
        cut, case.name, recovery(model, eval_x, eval_y), frequency_baseline(train_y, eval_y), defense.clip,
        float(std.mean()), len(eval_y), coverage,
    )  # fmt: skip
    if settings.exact_tokens == 0:
        return row
    started = time.perf_counter()
    proposals = None
    if settings.proposals > 0:
        with torch.no_grad():
            logits = model(windowed(sent, device.mask, settings.window).flatten(0, 1))  # (N T, V)
        proposals = logits.topk(min(settings.proposals, logits.shape[-1]), dim=-1).indices.view(*sent.shape[:2], -1)
    found = search_sequences(segment, cut, sent, device, channel, settings.exact_tokens, proposals, progress)
    match = "vectors"
    if not case.knows_adapters and found.exact < 1:  # the completed segment may be off by a scale: match directions
        turned = search_sequences(
            segment, cut, sent, device, replace(channel, direction=True), settings.exact_tokens, proposals, progress
        )
        if turned.exact > found.exact:
            found, match = turned, "directions"
    return replace(row, **asdict(found), exact_seconds=time.perf_counter() - started, exact_match=match)


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
    settings: AttackSettings = DEFAULT_SETTINGS,
    progress: Progress | None = None,
) -> list[LabelResult]:
    """Label recovery from (hidden, gradient) at the U-shaped split's top cut, for each tail size ``k``."""
    total = num_layers(load_config(source))
    if not tails or any(not 0 <= k <= total - 1 for k in tails):
        raise ConfigError(f"tails must be in 0..{total - 1}, got {list(tails)}")
    public, device = attack_tokens(source, settings)
    segment = build_segment(source, SegmentSpec.whole(total))
    head = weight_of(segment, segment.family.lm_head)  # (V, C): the attacker knows it
    pub, dev = _tail_gradients(segment, public, tails), _tail_gradients(segment, device, tails)
    pub_valid, dev_valid = public.targets != IGNORE_INDEX, device.targets != IGNORE_INDEX
    train_y, eval_y = public.targets[pub_valid], device.targets[dev_valid]
    results = []
    for k in tails:
        hidden, grad, guess = pub[k]
        train_x = torch.cat([hidden[pub_valid], grad[pub_valid]], dim=-1)  # (n, 2C)
        model = train_attack(rows_of(train_x), train_y, head, settings, prior={1: -1.0})
        hidden, grad, guess = dev[k]
        rate = recovery(model, torch.cat([hidden[dev_valid], grad[dev_valid]], dim=-1), eval_y)
        own = float((guess[dev_valid] == eval_y).float().mean())
        row = LabelResult(k, total - k, rate, own, frequency_baseline(train_y, eval_y), len(eval_y))
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
    bottleneck: Bottleneck | None = None,
    bottleneck_lr: float = 0.05,
) -> tuple[Segment, Segment]:
    """LoRA fine-tuning through the split in one process: client -> :func:`defend` (-> ``bottleneck``) ->
    server, with the NoPeek, distance and bottleneck terms added to the loss when set. Returns the trained
    (client, server) segments; ``bottleneck`` trains in place, at its own learning rate ``bottleneck_lr`` (its
    3 C numbers would barely move in a few dozen steps at the adapters' rate).

    End-to-end autograd through ``defend`` gives the gradients the split's wire would carry.
    """
    total = num_layers(load_config(source))
    client = build_segment(source, SegmentSpec.client(cut), lora=lora, lora_seed=seed)
    server = build_segment(source, SegmentSpec.server(cut, total), lora=lora, lora_seed=seed)
    params = [*client.lora_parameters().values(), *server.lora_parameters().values()]
    groups: list[dict[str, object]] = [{"params": params}]
    if bottleneck is not None:
        groups.append({"params": list(bottleneck.parameters()), "lr": bottleneck_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    pad = int(load_tokenizer(source).pad_token_id)
    batches, gen = Batches(examples, batch_size, pad, seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids, labels, lengths = batches.next()
        mask = padding_mask(lengths, ids.shape[1])
        hidden = client(ids, mask)  # (B, T, C)
        sent = defend(hidden, defense, gen)
        if bottleneck is not None:
            sent, kl = bottleneck(sent, gen)
        loss = causal_lm_loss(server(sent, mask), labels)
        if bottleneck is not None:
            loss = loss + bottleneck.loss(kl, mask)
        if defense.nopeek > 0:
            loss = loss + nopeek_loss(ids, hidden, mask, defense.nopeek, generator=gen)
        if defense.distance > 0:
            with torch.no_grad(), client.peft_model.disable_adapter():
                base = client(ids, mask)
            loss = loss + distance_loss(hidden, base, mask, defense.distance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % 25 == 0:
            progress(
                f"finetune cut {cut} [{defense.describe()}{'' if bottleneck is None else f', bottleneck {bottleneck.weight:g}'}]: "
                f"step {step + 1}/{steps}, loss {float(loss.detach()):.3f}"
            )
    return client, server


def evaluate_split(
    client: Segment,
    server: Segment,
    defense: DefenseSettings,
    examples: Sequence[Example],
    pad_id: int,
    seed: int = 1,
    bottleneck: Bottleneck | None = None,
) -> EvalResult:
    """Eval loss and perplexity of the split with the device's defense (and bottleneck) applied, as deployed."""
    gen = torch.Generator().manual_seed(seed)

    def loss_of(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> TargetLoss:
        sent = defend(client(ids, mask), defense, gen)
        if bottleneck is not None:
            sent = bottleneck(sent, gen)[0]
        return server.target_loss(sent, mask, labels)

    batches = [collate(examples[i : i + 16], pad_id) for i in range(0, len(examples), 16)]
    return evaluate_lm(loss_of, batches)


# --------------------------------------------------------------------------- the whole audit


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
    settings: AttackSettings = DEFAULT_SETTINGS,
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
