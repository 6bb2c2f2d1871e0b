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

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

import torch
import typer
from transformers.utils import logging as hf_logging

#: Bump when a change to this script changes what a given set of settings produces (invalidates caches).
from splitft.shared.cli_options import check_choices, run_app
from splitft.tools.pretrain.settings import DEMO, FAMILIES, PRECISIONS, Settings, default_output
from splitft.tools.pretrain.train import build_base

# --------------------------------------------------------------------------- command line


def bf16_is_fast(device: str) -> bool:
    """Whether ``device`` has native bf16 matrix units (a CPU with AVX-512 BF16 or AMX; a recent GPU)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclasses.dataclass(frozen=True)
class Options:
    """The options of the command line that are not :class:`Settings` (they do not change the trained weights)."""

    out: Path | None = None
    force: bool = False
    print_path: bool = False
    threads: int = 2
    device: str = "cpu"


Then = Callable[[Settings, Options], int]

_BUDGET = ("tokens", "steps", "minutes")  # at most one of them


def _app(d: Settings, then: Then) -> typer.Typer:
    """The command line, its defaults those of ``d`` (:data:`DEMO` with ``--demo``); ``then`` gets what it says."""
    app = typer.Typer(add_completion=False)

    @app.command(help=__doc__.split("\n\n")[0])
    def pretrain(
        ctx: typer.Context,
        demo: Annotated[
            bool,
            typer.Option(
                "--demo",
                help="the main job's small base (scripts/demo.sh): its settings become the defaults below",
            ),
        ] = False,
        family: Annotated[str, typer.Option("--family", help=f"one of: {', '.join(FAMILIES)}")] = d.family,
        out: Annotated[
            Path | None, typer.Option("--out", help="output folder (default: the cache, see --print-path)")
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="retrain even if the output exists")] = False,
        print_path: Annotated[bool, typer.Option("--print-path", help="print the output folder and exit")] = False,
        threads: Annotated[int, typer.Option("--threads", help="torch threads (recorded)")] = 2,
        device: Annotated[str, typer.Option("--device", help="cpu or cuda (not part of the cache key)")] = "cpu",
        precision: Annotated[
            str,
            typer.Option(
                "--precision",
                help="bf16 autocast or fp32; auto: bf16 where the device runs it natively (part of the cache key); "
                "one of: auto, fp32, bf16",
            ),
        ] = "auto",
        tokens: Annotated[
            int,
            typer.Option(
                "--tokens",
                help="token budget (default: about 12 minutes, see DEFAULT_TOKENS; --demo: about a minute); "
                "at most one of --tokens, --steps, --minutes",
            ),
        ] = d.tokens,
        steps: Annotated[int, typer.Option("--steps", help="optimizer steps (overrides the token budget)")] = 0,
        minutes: Annotated[float, typer.Option("--minutes", help="wall-clock budget: size the run to it")] = 0.0,
        vocab_size: Annotated[int, typer.Option("--vocab-size")] = d.vocab_size,
        layers: Annotated[int, typer.Option("--layers")] = d.layers,
        hidden: Annotated[int, typer.Option("--hidden")] = d.hidden,
        heads: Annotated[int, typer.Option("--heads")] = d.heads,
        kv_heads: Annotated[int, typer.Option("--kv-heads")] = d.kv_heads,
        intermediate: Annotated[int, typer.Option("--intermediate")] = d.intermediate,
        seq_len: Annotated[int, typer.Option("--seq-len")] = d.seq_len,
        batch_size: Annotated[int, typer.Option("--batch-size")] = d.batch_size,
        lr: Annotated[float, typer.Option("--lr")] = d.lr,
        min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio")] = d.min_lr_ratio,
        warmup_steps: Annotated[int, typer.Option("--warmup-steps")] = d.warmup_steps,
        weight_decay: Annotated[float, typer.Option("--weight-decay")] = d.weight_decay,
        dropout: Annotated[float, typer.Option("--dropout")] = d.dropout,
        seed: Annotated[int, typer.Option("--seed")] = d.seed,
        corpus_chars: Annotated[int, typer.Option("--corpus-chars")] = d.corpus_chars,
        eval_every: Annotated[int, typer.Option("--eval-every")] = d.eval_every,
        eval_tokens: Annotated[int, typer.Option("--eval-tokens")] = d.eval_tokens,
        final_eval_tokens: Annotated[int, typer.Option("--final-eval-tokens")] = d.final_eval_tokens,
    ) -> int:
        check_choices("--family", family, FAMILIES)
        check_choices("--precision", precision, ("auto", *PRECISIONS))
        given = [name for name in _BUDGET if _given(ctx, name)]
        if len(given) > 1:
            raise typer.BadParameter(f"not allowed with --{given[0]}", param_hint=f"'--{given[1]}'")
        if precision == "auto":
            precision = "bf16" if bf16_is_fast(device) else "fp32"
        values = {**ctx.params, "precision": precision}
        settings = Settings(**{f.name: values[f.name] for f in dataclasses.fields(Settings) if f.name in values})
        return then(settings, Options(out, force, print_path, threads, device))

    return app


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _run(then: Then, argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_app(_app(DEMO if "--demo" in args else Settings(), then), args)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Options]:
    """The settings and the other options of a command line (default: the process's). ``--help`` and a bad
    command line end the process (exit 0, 2), as they would end the command."""
    parsed: list[tuple[Settings, Options]] = []

    def keep(settings: Settings, options: Options) -> int:
        parsed.append((settings, options))
        return 0

    code = _run(keep, argv)
    if not parsed:
        raise SystemExit(code)
    return parsed[0]


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/pretrain_base.py``: build (or find) the base and print its folder; returns the exit code."""
    return _run(_build, argv)


def _build(settings: Settings, options: Options) -> int:
    out = options.out or default_output(settings)
    if options.print_path:
        print(out)
        return 0
    torch.set_num_threads(options.threads)
    hf_logging.disable_progress_bar()
    with _progress_bar() as progress:
        log = progress.console.print if progress is not None else None
        path = build_base(
            settings,
            out,
            force=options.force,
            device=options.device,
            progress=progress,
            **({"log": log} if log else {}),
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
