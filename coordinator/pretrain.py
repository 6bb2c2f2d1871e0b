"""Pretrain a small base model worth fine-tuning (issue 5, part 1): 12 blocks, about 10-20M parameters.

LoRA on random frozen weights is not fine-tuning. This script builds a real (if small) base from the
text vendored in the package (``splitft/shared/datasets``), so it runs from a clean clone with nothing
downloaded:

1. a byte-level BPE tokenizer (``tokenizers``, vocab 8,192; ``<|endoftext|>`` is EOS and BOS as in
   GPT-2, ``<|pad|>`` pads) trained on the training text;
2. a GPT-2-style or LLaMA-style model (``--family``) pretrained on that text: WikiText-2 ``test.txt``
   plus the E2E reference texts (``valid.txt``; WikiText-2's ``train.txt`` is not vendored), packed
   into windows with EOS between documents, validated on WikiText-2 ``valid.txt`` (perplexity);
3. a normal Hugging Face folder (safetensors, the tokenizer as ``PreTrainedTokenizerFast``, and
   ``pretrain.json`` with the training facts), written to a temp folder and renamed into place.

Deterministic: fixed seeds (model init, dropout, data order), ``torch.use_deterministic_algorithms``,
a fixed token budget; the torch thread count is recorded (default 2; bits can differ with another
count or device). The default output is a cache folder outside the repo,
``$SPLITFT_CACHE/base/<family>-<hash>`` (default ``~/.cache/splitft/base/...``), keyed by a hash of
every setting that decides the result and of the data; if it exists the script prints it and exits.

    python scripts/pretrain_base.py --family gpt2          # ~12 min on 2 cores; prints the folder
    python scripts/pretrain_base.py --family llama
    python scripts/pretrain_base.py --family gpt2 --minutes 5   # size the run to a wall-clock budget
    splitft-coordinator inspect --model "$(python scripts/pretrain_base.py --family gpt2 --print-path)" --cut 3

``--minutes`` sizes the run from the measured speed of its first steps (so the learning-rate schedule
still completes); such a run depends on the machine's speed, and its step count is recorded so that
``--steps`` can repeat it exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from splitft.shared.text import DATASETS

#: Bump when a change to this script changes what a given set of settings produces (invalidates caches).
FORMAT_VERSION = 1
EOS = "<|endoftext|>"
PAD = "<|pad|>"
FACTS_FILE = "pretrain.json"
FAMILIES = ("gpt2", "llama")
PRECISIONS = ("fp32", "bf16")

#: The vendored text: training (WikiText-2 test split, E2E references) and validation (WikiText-2 valid).
WIKITEXT_TRAIN = DATASETS / "wikitext-2" / "test.txt.gz"
WIKITEXT_VALID = DATASETS / "wikitext-2" / "valid.txt.gz"
E2E_TRAIN = DATASETS / "e2e" / "valid.txt.gz"
DATA_FILES = (WIKITEXT_TRAIN, E2E_TRAIN, WIKITEXT_VALID)

#: Default token budgets by (family, precision): about 11 minutes of training (12 with tokenizer,
#: validation and saving) per family with the default shape on 2 free cores of an AMD EPYC (Zen 4, AVX-512
#: BF16), measured at about 2,100 tokens/s for either family with bf16 autocast and 1,320 (gpt2) / 1,490
#: (llama) in fp32; pretrain.json records each run's speed. Both families together: about 25 minutes.
DEFAULT_TOKENS = {
    ("gpt2", "bf16"): 1_400_000,
    ("llama", "bf16"): 1_400_000,
    ("gpt2", "fp32"): 900_000,
    ("llama", "fp32"): 1_000_000,
}

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights (the cache key hashes all of it plus the data)."""

    family: str = "gpt2"
    vocab_size: int = 8192
    layers: int = 12
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2  # llama only: grouped-query attention, as in the tiny-llama preset
    intermediate: int = 0  # MLP width; 0: 4 * hidden (gpt2), 688 ~ 8/3 * hidden rounded to 16 (llama)
    seq_len: int = 256  # training window; also the model's position limit (GPT-2's learned positions)
    batch_size: int = 8
    tokens: int = 0  # token budget; 0: DEFAULT_TOKENS[family, precision] (ignored when steps or minutes is set)
    steps: int = 0  # optimizer steps; overrides tokens
    minutes: float = 0.0  # size the run to this wall-clock budget instead (machine-dependent)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    dropout: float = 0.0  # while pretraining (a few epochs: none needed); the saved config has none
    grad_clip: float = 1.0
    precision: str = "fp32"  # or "bf16": bf16 autocast (fp32 weights and optimizer); the CLI picks bf16 where fast
    seed: int = 0
    corpus_chars: int = 0  # use only the first N characters of each text (tests); 0: all
    eval_every: int = 0  # steps between validations; 0: five per run
    eval_tokens: int = 16_384  # validation tokens per periodic check (in the training precision)
    final_eval_tokens: int = 65_536  # validation tokens of the final check (fp32); 0: all (~287k, slow on a CPU)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden % self.heads or (self.family == "llama" and self.heads % self.kv_heads):
            raise ValueError("hidden must divide by heads (and heads by kv_heads for llama)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if min(self.vocab_size - 258, self.layers, self.seq_len - 1, self.batch_size) < 1:
            raise ValueError("vocab_size > 258 (bytes + special tokens), layers, batch_size >= 1, seq_len >= 2")

    @property
    def mlp_width(self) -> int:
        if self.intermediate:
            return self.intermediate
        return 4 * self.hidden if self.family == "gpt2" else 16 * round(8 * self.hidden / 3 / 16)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def planned_steps(self) -> int | None:
        """Steps the run will take, or None when ``minutes`` decides it during the run."""
        if self.steps:
            return self.steps
        if self.minutes:
            return None
        return max(1, (self.tokens or DEFAULT_TOKENS[self.family, self.precision]) // self.tokens_per_step)

    def key(self) -> dict[str, Any]:
        """The settings that decide the result, budget resolved (tokens, steps or minutes: whichever rules)."""
        key = dataclasses.asdict(self)
        planned = self.planned_steps()
        key["tokens"] = key["steps"] = key["minutes"] = None
        if planned is None:
            key["minutes"] = self.minutes
        else:
            key["steps"] = planned
        key["intermediate"] = self.mlp_width
        if self.family == "gpt2":
            key["kv_heads"] = None
        return key


def data_digest() -> dict[str, str]:
    """SHA-256 of each vendored file the run reads, by name."""
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in DATA_FILES}


def settings_hash(settings: Settings) -> str:
    payload = {"format": FORMAT_VERSION, "settings": settings.key(), "data": data_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_root() -> Path:
    """``$SPLITFT_CACHE`` or ``~/.cache/splitft``."""
    env = os.environ.get("SPLITFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitft"


def default_output(settings: Settings) -> Path:
    return cache_root() / "base" / f"{settings.family}-{settings_hash(settings)[:12]}"


# --------------------------------------------------------------------------- text


def read_text(path: Path, limit: int = 0) -> str:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    return text[:limit] if limit else text


_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)  # a WikiText article title; sections are " = = x = = "


def wikitext_articles(text: str) -> list[str]:
    """The articles of a WikiText file, in order, each stripped of surrounding blank lines."""
    starts = [m.start() for m in _HEADING.finditer(text)] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    pieces = [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [p for p in pieces if p]


def e2e_references(text: str) -> list[str]:
    """The reference texts of E2E lines ``meaning representation||reference``."""
    return [line.split("||", 1)[1].strip() for line in text.splitlines() if "||" in line]


def corpus(settings: Settings) -> tuple[list[str], list[str]]:
    """(training documents, validation documents), in a fixed order."""
    limit = settings.corpus_chars
    train = wikitext_articles(read_text(WIKITEXT_TRAIN, limit)) + e2e_references(read_text(E2E_TRAIN, limit))
    valid = wikitext_articles(read_text(WIKITEXT_VALID, limit))
    return train, valid


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ``documents`` (ids 0 and 1 are EOS and PAD)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )


def encode(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> torch.Tensor:
    """One stream of token ids (int64): each document followed by EOS."""
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


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


def pretrain(settings: Settings, out: Path, *, device: str = "cpu", log: Log = _print) -> dict[str, Any]:
    """Train the tokenizer and the model, save both to ``out`` atomically; return the training facts."""
    started = time.perf_counter()
    digest = settings_hash(settings)
    if device.startswith("cuda"):  # deterministic cuBLAS (set before the first CUDA matmul)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with torch.random.fork_rng(devices=[]):
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            torch.manual_seed(settings.seed)
            model, tokenizer, facts = _train(settings, device, log)
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


def _train(settings: Settings, device: str, log: Log) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, dict]:
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
    settings: Settings, out: Path | None = None, *, force: bool = False, device: str = "cpu", log: Log = _print
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
    pretrain(settings, out, device=device, log=log)
    return out


# --------------------------------------------------------------------------- command line


def bf16_is_fast(device: str) -> bool:
    """Whether ``device`` has native bf16 matrix units (a CPU with AVX-512 BF16 or AMX; a recent GPU)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="gpt2")
    p.add_argument("--out", type=Path, help="output folder (default: the cache, see --print-path)")
    p.add_argument("--force", action="store_true", help="retrain even if the output exists")
    p.add_argument("--print-path", action="store_true", help="print the output folder and exit")
    p.add_argument("--threads", type=int, default=2, help="torch threads (recorded; default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (not part of the cache key)")
    p.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="bf16 autocast or fp32; auto: bf16 where the device runs it natively (part of the cache key)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--tokens", type=int, default=0, help="token budget (default: about 12 minutes, see DEFAULT_TOKENS)"
    )
    budget.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides the token budget)")
    budget.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget: size the run to it")
    for name in (
        "vocab_size", "layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len", "batch_size",
        "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "dropout", "seed", "corpus_chars",
        "eval_every", "eval_tokens", "final_eval_tokens",
    ):  # fmt: skip
        default = getattr(d, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=f"default {default}")
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Settings)}
    if args.precision == "auto":
        args.precision = "bf16" if bf16_is_fast(args.device) else "fp32"
    settings = Settings(**{k: v for k, v in vars(args).items() if k in fields})
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    out = args.out or default_output(settings)
    if args.print_path:
        print(out)
        return 0
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    path = build_base(settings, out, force=args.force, device=args.device)
    print(path)
    return 0
