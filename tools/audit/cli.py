"""The ``splitft-coordinator audit`` command: the privacy audit of :mod:`splitft.tools.audit` on a model, its
tables printed and its report written to ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from safetensors.torch import load_file

from splitft.coordinator.cli_support import ModelOpt, check_out, fail, new_console, staged, write_error
from splitft.shared.errors import ConfigError, ModelError, SplitFTError
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.loading import hidden_size, load_config, num_layers
from splitft.shared.model.lora import lora_state
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.tools.audit.attack import AttackSettings, DefenseCase, device_examples
from splitft.tools.audit.measure import AuditReport, audit_inversion, audit_labels, finetune_split, parse_cuts
from splitft.tools.audit.report import best_cell, write_report


def audit(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for audit.md, audit.json and audit.png.")],
    cuts: Annotated[str, typer.Option(help="Cut layers to attack: 'all' (1..L-1) or e.g. '1,2,3'.")] = "all",
    public_tokens: Annotated[int, typer.Option(help="Public-text tokens the attacker trains on.")] = 32768,
    eval_tokens: Annotated[int, typer.Option(help="Held-out device tokens (GSM8K train) it is scored on.")] = 4096,
    steps: Annotated[int, typer.Option(help="Optimizer steps of each inverse model.")] = 400,
    noise: Annotated[float, typer.Option(help="Defense: Gaussian noise, per-token norm ~ noise x clip.")] = 0.0,
    clip: Annotated[
        str | None, typer.Option(help="Defense: per-token L2 clip, a number or 'median' (of the public norms).")
    ] = None,
    nopeek: Annotated[
        float, typer.Option(help="Defense: NoPeek weight (training-time; needs --finetune-steps).")
    ] = 0.0,
    distance: Annotated[
        float, typer.Option(help="Defense: distance-from-base weight (training-time; needs --finetune-steps).")
    ] = 0.0,
    finetune_steps: Annotated[
        int, typer.Option(help="Fine-tune LoRA through the split with the defense on (per cut) before attacking.")
    ] = 0,
    adapter: Annotated[
        Path | None, typer.Option(help="Attack these client adapters (a PEFT adapter folder) instead of the base.")
    ] = None,
    private: Annotated[
        bool,
        typer.Option(
            help="The --adapter's client blocks are private (private_adapters): the attacker runs the public base."
        ),
    ] = False,
    tails: Annotated[
        str, typer.Option(help="U-split label leakage: device tail sizes k, e.g. '0,1,2'; '' skips.")
    ] = "0,1",
    exact_tokens: Annotated[
        int, typer.Option(help="Device tokens the exact-search attacker recovers (the first sequences); 0 = off.")
    ] = 256,
    proposals: Annotated[
        int,
        typer.Option(
            help="Exact search candidates per position: 0 = the whole vocabulary, k = the learned inverse's top k."
        ),
    ] = 0,
    wire_dtype: Annotated[
        str, typer.Option(help="The wire dtype of the activations: fp16, bf16, int8, fp32.")
    ] = "fp16",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Privacy audit as the server would attack: token recovery from the activations at each cut
    (plain and defended) and label recovery from the U-shaped split's returned gradients."""
    console = new_console()
    try:
        check_out(out)
        config = load_config(model)
        total = num_layers(config)
        cut_list = parse_cuts(cuts, total)
        try:
            tail_list = sorted({int(t) for t in tails.split(",") if t.strip()})
        except ValueError as exc:
            raise ConfigError(f"--tails must be comma-separated integers, got {tails!r}") from exc
        settings = AttackSettings(
            public_tokens=public_tokens, eval_tokens=eval_tokens, steps=steps, seed=seed, exact_tokens=exact_tokens,
            proposals=proposals, wire_dtype=wire_dtype,
        )  # fmt: skip
        median = clip is not None and clip.strip() == "median"
        try:
            clip_value = None if clip is None or median else float(clip)
        except ValueError as exc:
            raise ConfigError(f"--clip must be a number or 'median', got {clip!r}") from exc
        defense = DefenseSettings(noise=noise, clip=clip_value, nopeek=nopeek, distance=distance)
        if finetune_steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {finetune_steps}")
        if (nopeek > 0 or distance > 0) and finetune_steps == 0:
            raise ConfigError("--nopeek and --distance act in training: give --finetune-steps N to train with them")
        if median and finetune_steps > 0:
            raise ConfigError("--clip median is calibrated by the attack only; give a number with --finetune-steps")
        adapters = None
        if adapter is not None:
            weights = adapter / "adapter_model.safetensors"
            if not weights.is_file():
                raise ModelError(f"--adapter {adapter}: no adapter_model.safetensors there")
            adapters = load_file(weights)  # safetensors: tensors only, nothing executed
        if private and adapters is None and finetune_steps == 0:
            raise ConfigError("--private attacks adapters the server does not have: give --adapter or --finetune-steps")
        base = DefenseCase(
            "none" if not private else "none, private adapters", adapters=adapters, knows_adapters=not private
        )
        cases = [base]
        defended = defense.active or nopeek > 0 or distance > 0
        if defended and finetune_steps == 0:
            cases.append(
                DefenseCase(
                    defense.describe() if not median else f"clip median, noise {noise:g}",
                    defense,
                    0.5 if median else None,
                    adapters,
                    knows_adapters=not private,
                )
            )

        def progress(message: str) -> None:
            console.print(f"  {message}", highlight=False)

        console.print(f"[bold]privacy audit[/bold] of {model}: cuts {cut_list}, tails {tail_list or 'none'}")
        inversion = audit_inversion(model, cut_list, cases, settings, progress)
        if defended and finetune_steps > 0:
            tokenizer = load_tokenizer(model)
            examples = device_examples(tokenizer, finetune_steps * 8 * settings.max_length, settings.max_length)
            for cut in cut_list:
                client, _ = finetune_split(
                    model, cut, defense, examples, steps=finetune_steps, seed=seed, progress=progress
                )
                case = DefenseCase(
                    f"{defense.describe()}, fine-tuned", defense, adapters=lora_state(client.peft_model),
                    knows_adapters=not private,
                )  # fmt: skip
                inversion += audit_inversion(model, [cut], [case], settings, progress)
        labels = audit_labels(model, tail_list, settings, progress) if tail_list else []
        report = AuditReport(model, total, hidden_size(config), int(config.vocab_size), settings, inversion, labels)
        with staged(out) as staging:
            write_report(report, staging)
    except SplitFTError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(out, exc)) from exc
    names = list(dict.fromkeys(r.defense for r in report.inversion))
    table = Table(title="Token recovery from the activations at the cut by the best attacker (held-out GSM8K)")
    for column in ("cut", "baseline", *names):
        table.add_column(column, justify="right")
    by = {(r.defense, r.cut): r for r in report.inversion}
    for c in cut_list:
        baseline = next(r.baseline for r in report.inversion if r.cut == c)
        table.add_row(str(c), f"{baseline:.1%}", *(best_cell(by[(n, c)]) if (n, c) in by else "-" for n in names))
    console.print(table)
    if labels:
        leak = Table(title="U-split label leakage: labels recovered by the server")
        for column in ("device tail k", "server sees block", "from hidden + gradient", "own guess", "baseline"):
            leak.add_column(column, justify="right")
        for r in labels:
            leak.add_row(str(r.tail), str(r.depth), f"{r.recovery:.1%}", f"{r.hidden_only:.1%}", f"{r.baseline:.1%}")
        console.print(leak)
    console.print(f"table {out / 'audit.md'}, numbers {out / 'audit.json'}, plot {out / 'audit.png'}")
