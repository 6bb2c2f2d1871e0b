"""The model, its training loop and evaluation, and the saved (cached) base folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from splitft.tools.pretrain.corpus import corpus, encode, train_tokenizer

#: Bump when a change to this script changes what a given set of settings produces (invalidates caches).
from splitft.tools.pretrain.settings import (
    FACTS_FILE,
    FORMAT_VERSION,
    Log,
    Progress,
    Settings,
    _print,
    data_digest,
    default_output,
    settings_hash,
)

# --------------------------------------------------------------------------- model


def model_config(settings: Settings, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    s, vocab = settings, len(tokenizer)
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    if s.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=s.seq_len,
            n_embd=s.hidden,
            n_layer=s.layers,
            n_head=s.heads,
            n_inner=s.mlp_width,
            resid_pdrop=s.dropout,
            embd_pdrop=s.dropout,
            attn_pdrop=s.dropout,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
            tie_word_embeddings=True,
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        intermediate_size=s.mlp_width,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.seq_len,
        attention_dropout=s.dropout,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _without_dropout(config: PretrainedConfig) -> None:
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "summary_first_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training


def windows(stream: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping ``(N, length + 1)`` windows from ``offset`` (each shares one token with the next)."""
    usable = (len(stream) - offset - 1) // length
    idx = offset + torch.arange(usable).unsqueeze(1) * length + torch.arange(length + 1)
    return stream[idx]


def batches(stream: torch.Tensor, settings: Settings) -> Iterator[torch.Tensor]:
    """Endless ``(B, seq_len + 1)`` batches: epoch ``e`` shifts the window grid by a seeded offset and
    visits the windows in a seeded permutation (``torch.Generator`` from ``seed`` and ``e``)."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
        offset = int(torch.randint(settings.seq_len, (1,), generator=gen)) if epoch else 0
        w = windows(stream, settings.seq_len, offset)
        if len(w) < settings.batch_size:
            raise ValueError(f"the training text gives {len(w)} windows, fewer than one batch")
        order = torch.randperm(len(w), generator=gen)
        for i in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
            yield w[order[i : i + settings.batch_size]]
        epoch += 1


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Mean next-token cross-entropy of a ``(B, T + 1)`` batch (computed in fp32 whatever the precision)."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    stream: torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_tokens: int = 0,
    precision: str = "fp32",
) -> dict:
    """Mean next-token loss and perplexity on ``stream`` (about the first ``max_tokens`` targets; 0: all)."""
    was_training = model.training
    model.eval()
    w = windows(stream, seq_len)
    if max_tokens:
        w = w[: max(1, max_tokens // seq_len)]
    total, count = 0.0, 0
    for i in range(0, len(w), batch_size):
        batch = w[i : i + batch_size]
        total += float(lm_loss(model, batch, precision)) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


def lr_at(step: int, total: int, settings: Settings) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at ``total``."""
    warmup = max(1, settings.warmup_steps)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return settings.lr * (
        settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def _optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


def pretrain(
    settings: Settings, out: Path, *, device: str = "cpu", log: Log = _print, progress: Progress | None = None
) -> dict[str, Any]:
    """Train the tokenizer and the model, save both to ``out`` atomically; return the training facts.
    ``progress(step, total)`` is called after every optimizer step (total None until ``--minutes`` fixes it)."""
    started = time.perf_counter()
    digest = settings_hash(settings)
    if device.startswith("cuda"):  # deterministic cuBLAS (set before the first CUDA matmul)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with torch.random.fork_rng(devices=[]):
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            torch.manual_seed(settings.seed)
            model, tokenizer, facts = _train(settings, device, log, progress)
        finally:
            torch.use_deterministic_algorithms(deterministic)
    facts.update(
        settings=settings.key(),
        settings_hash=digest,
        data_sha256=data_digest(),
        format_version=FORMAT_VERSION,
        seconds=round(time.perf_counter() - started, 1),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        device=device,
    )
    _save(model, tokenizer, facts, out)
    log(f"saved {out} ({facts['seconds']:.0f} s)")
    return facts


def _train(
    settings: Settings, device: str, log: Log, progress: Progress | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
    s = settings
    t0 = time.perf_counter()
    train_docs, valid_docs = corpus(s)
    tokenizer = train_tokenizer(train_docs, s.vocab_size, s.seq_len)
    train_ids, valid_ids = encode(tokenizer, train_docs), encode(tokenizer, valid_docs)
    valid_bytes = sum(len(d.encode()) + 1 for d in valid_docs)
    log(
        f"tokenizer: {len(tokenizer):,} tokens ({time.perf_counter() - t0:.1f} s); "
        f"train {len(train_ids):,} tokens ({len(train_docs):,} documents), valid {len(valid_ids):,} tokens"
    )

    model = AutoModelForCausalLM.from_config(model_config(s, tokenizer)).to(device)
    model.train()
    params = parameter_count(model)
    embedding = model.get_input_embeddings().weight.numel()
    log(
        f"{s.family}: {s.layers} blocks, hidden {s.hidden}, {params:,} parameters "
        f"({params - embedding:,} without the token embedding)"
    )
    optimizer = _optimizer(model, s)
    total = s.planned_steps()
    probe = min(10, s.warmup_steps)  # --minutes: steps timed before the run's length is fixed
    eval_every = s.eval_every
    stream = batches(train_ids, s)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    window: list[float] = []
    tokens = 0
    step = 0
    train_start = time.perf_counter()
    last_log = train_start
    eval_seconds = 0.0  # excluded from the training speed
    log_every = 20.0  # seconds between progress lines
    while total is None or step < total:
        batch = next(stream).to(device)
        lr = lr_at(step, total or 10**9, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = lm_loss(model, batch, s.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"the loss is {value} at step {step}: lower --lr")
        losses.append(value)
        window.append(value)
        step += 1
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        now = time.perf_counter()
        if progress is not None:
            progress(step, total)
        if total is None and step == probe:
            per_step = (now - train_start) / step
            budget = s.minutes * 60 * 0.92 - (now - t0)  # keep ~8% for validations and saving
            total = max(step + 1, int(budget / per_step))
            log(f"--minutes {s.minutes:g}: {per_step:.2f} s/step measured, so {total} steps")
        if not eval_every and total is not None:
            eval_every = max(1, total // 5)
        if eval_every and step % eval_every == 0 and step != total:
            before = time.perf_counter()
            v = evaluate(model, valid_ids, s.seq_len, s.batch_size, s.eval_tokens, s.precision)
            eval_seconds += time.perf_counter() - before
            history.append({"step": step, "tokens": tokens, "valid_loss": round(v["loss"], 4), "valid_ppl": v["ppl"]})
            log(f"step {step}: validation loss {v['loss']:.3f}, perplexity {v['ppl']:.1f} ({v['tokens']:,} tokens)")
        if now - last_log >= log_every or step == total or step == 1:
            rate = tokens / max(1e-9, now - train_start - eval_seconds)
            eta = (total - step) * (now - train_start) / step if total else float("nan")
            log(
                f"step {step}/{total or '?'}: loss {sum(window) / len(window):.3f}, lr {lr:.2e}, "
                f"{rate:,.0f} tokens/s, eta {eta / 60:.1f} min"
            )
            window, last_log = [], now
    train_seconds = time.perf_counter() - train_start - eval_seconds
    final = evaluate(model, valid_ids, s.seq_len, s.batch_size, s.final_eval_tokens)  # fp32, as it will be used
    bytes_scored = final["tokens"] * valid_bytes / max(1, len(valid_ids))  # approx.: mean bytes per token
    log(
        f"final validation ({final['tokens']:,} tokens of WikiText-2 valid, fp32): "
        f"loss {final['loss']:.3f}, perplexity {final['ppl']:.1f}"
    )
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    facts = {
        "family": s.family,
        "parameters": params,
        "vocab_size": len(tokenizer),
        "steps": step,
        "tokens": tokens,
        "train_tokens_per_epoch": len(train_ids),
        "epochs": round(tokens / len(train_ids), 2),
        "first_train_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        "valid_loss": final["loss"],
        "valid_ppl": final["ppl"],
        "valid_bits_per_byte": final["loss"] * final["tokens"] / math.log(2) / bytes_scored,
        "valid_tokens": final["tokens"],
        "valid_history": history,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "tokens_per_s": round(tokens / train_seconds, 1),
        "seed": s.seed,
        "train_text": ["wikitext-2/test.txt (articles)", "e2e/valid.txt (reference texts)"],
        "valid_text": "wikitext-2/valid.txt",
    }
    model.to("cpu")
    return model, tokenizer, facts


# --------------------------------------------------------------------------- saving and the cache


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, facts: dict, out: Path) -> None:
    """Write the folder next to ``out`` under a temp name, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _without_dropout(model.config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / FACTS_FILE).write_text(json.dumps(facts, indent=2) + "\n")
        for file in tmp.iterdir():  # safetensors are written owner-only; a shared cache wants them readable
            file.chmod(0o644)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_facts(out: Path, settings: Settings) -> dict | None:
    """The facts of ``out`` if it is a finished build of exactly these settings, else None."""
    try:
        facts = json.loads((out / FACTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(facts, dict) or facts.get("settings_hash") != settings_hash(settings):
        return None
    return facts if (out / "model.safetensors").is_file() else None


def build_base(
    settings: Settings,
    out: Path | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
    log: Log = _print,
    progress: Progress | None = None,
) -> Path:
    """The folder of a base model for ``settings``: the cached one, or a new one trained into ``out``."""
    out = out or default_output(settings)
    if not force and cached_facts(out, settings) is not None:
        log(f"cached: {out}")
        return out
    if not force and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a finished build of these settings: pick another --out or --force"
        )
    pretrain(settings, out, device=device, log=log, progress=progress)
    return out
