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
    python scripts/pretrain_base.py --demo                 # the main job's 6-block base (~1.5 min)
    splitft-coordinator inspect --model "$(python scripts/pretrain_base.py --family gpt2 --print-path)" --cut 3

``--minutes`` sizes the run from the measured speed of its first steps (so the learning-rate schedule
still completes); such a run depends on the machine's speed, and its step count is recorded so that
``--steps`` can repeat it exactly."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

#: Bump when a change to this script changes what a given set of settings produces (invalidates caches).
from splitft.tools.pretrain.settings import DEMO, FAMILIES, PRECISIONS, Settings, default_output
from splitft.tools.pretrain.train import build_base

# --------------------------------------------------------------------------- command line


def bf16_is_fast(device: str) -> bool:
    """Whether ``device`` has native bf16 matrix units (a CPU with AVX-512 BF16 or AMX; a recent GPU)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--demo", action="store_true")
    d = DEMO if first.parse_known_args(argv)[0].demo else Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--demo",
        action="store_true",
        help="the main job's small base (scripts/demo.sh): its settings become the defaults below",
    )
    p.add_argument("--family", choices=FAMILIES, default=d.family)
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
        "--tokens",
        type=int,
        default=d.tokens,
        help="token budget (default: about 12 minutes, see DEFAULT_TOKENS; --demo: about a minute)",
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
    with _progress_bar() as progress:
        log = progress.console.print if progress is not None else None
        path = build_base(
            settings, out, force=args.force, device=args.device, progress=progress, **({"log": log} if log else {})
        )
    print(path)
    return 0


class _StepBar:
    """A progress bar over the training steps on stderr (a terminal only; logs keep the lines)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=self.console
        )
        self.task = self.bar.add_task("steps", total=None)

    def __call__(self, step: int, total: int | None) -> None:
        if not self.bar.live.is_started:
            self.bar.start()
        self.bar.update(self.task, completed=step, total=total)


@contextlib.contextmanager
def _progress_bar() -> Iterator[_StepBar | None]:
    if not sys.stderr.isatty():
        yield None
        return
    bar = _StepBar()
    try:
        yield bar
    finally:
        bar.bar.stop()
