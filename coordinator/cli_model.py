"""The coordinator's model commands: ``inspect`` a split plan, ``verify-split`` it against the whole model,
``save-base`` a preset as a model folder, ``import`` a model for the fleet, ``generate`` answers, ``evaluate`` a
model.

``evaluate`` computes what the coordinator reports after each round, on the same examples: the loss and
perplexity over the answer tokens, next-token accuracy, and for GSM8K-style answers the exact match of the
final number, so an exported adapter can be checked against the job's figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from splitft.coordinator.answers import Comparison, generate, load_model, prompts_of, score
from splitft.coordinator.cli_support import (
    CutOpt,
    CutRankOpt,
    ModelOpt,
    RankOpt,
    check_data_file,
    check_out,
    fail,
    new_console,
    staged,
    write_error,
)
from splitft.coordinator.private import unseal_adapter
from splitft.coordinator.report import read_metrics
from splitft.shared.errors import ConfigError, ExitCode, ModelError, SplitFTError
from splitft.shared.job.config import torch_device
from splitft.shared.job.data import check_chat_template, collate, eval_examples
from splitft.shared.job.records import load_records
from splitft.shared.model.gguf import convert, is_gguf
from splitft.shared.model.loading import (
    ATTENTION_IMPLEMENTATIONS,
    MODEL_TYPES,
    load_config,
    model_fingerprint,
    num_layers,
)
from splitft.shared.model.lora import LoraSettings
from splitft.shared.model.loss import evaluate_lm, logits_loss
from splitft.shared.model.precision import DTYPES
from splitft.shared.model.split import load_base_model
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES
from splitft.shared.wire.sealed import load_fleet_key

AdapterOpt = Annotated[Path | None, typer.Option(help="A PEFT adapter folder (e.g. a job's adapter/) on the model.")]
ChatTemplateOpt = Annotated[
    str,
    typer.Option(
        help="auto: pairs and conversations through the tokenizer's chat template when it has one; true; false."
    ),
]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Tokens an answer may have, at most.")]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: auto, cpu, cuda.")]


def chat_template_flag(value: str) -> str | bool:
    """``--chat-template auto|true|false`` as the job setting."""
    setting: str | bool = {"true": True, "false": False}.get(value.lower(), value)
    try:
        check_chat_template(setting)
    except ConfigError as exc:
        raise ConfigError(f"--chat-template: {exc}") from exc
    return setting


def inspect(model: ModelOpt, cut: CutOpt, rank: RankOpt = 16, cut_rank: CutRankOpt = 8) -> None:
    """Print the split plan: what each side holds, the LoRA ranks, and the activation bytes per token.

    A model folder's config is checked against its weights (the blocks and the width they hold)."""
    from splitft.shared.model.plan import plan_split

    console = new_console()
    try:
        plan = plan_split(model, cut, LoraSettings(r=rank, r_cut=cut_rank))
    except (ConfigError, ModelError) as exc:
        raise fail(exc) from exc
    console.print(
        f"[bold]{plan.source}[/bold]: {plan.model_type} ({plan.family} family), {plan.num_layers} blocks, "
        f"hidden {plan.hidden_size}, vocab {plan.vocab_size}; cut at {plan.cut}"
    )
    sides = Table(title="Split plan")
    for column in ("side", "holds", "base params", "LoRA params", "LoRA rank per block"):
        sides.add_column(column)
    for side, holds in (
        (plan.client, f"embeddings + blocks 0..{plan.cut - 1}"),
        (plan.server, f"blocks {plan.cut}..{plan.num_layers - 1} + final norm + LM head"),
    ):
        ranks = ", ".join(f"{i}:{r}" for i, r in side.ranks.items())
        sides.add_row(side.name, holds, f"{side.base_params:,}", f"{side.lora_params:,}", ranks)
    console.print(sides)
    wire = Table(title="Activations on the wire (each direction, per token, before zstd)")
    wire.add_column("wire dtype")
    wire.add_column("bytes / token", justify="right")
    wire.add_column("vs fp32", justify="right")
    fp32 = plan.activation_bytes_per_token["fp32"]
    for dtype in FLOAT_WIRE_DTYPES:
        size = plan.activation_bytes_per_token[dtype]
        wire.add_row(dtype, f"{size:,.0f}", f"{fp32 / size:.2f}x smaller" if dtype != "fp32" else "")
    console.print(wire)


def verify_split(
    model: ModelOpt,
    cut: CutOpt,
    wire: Annotated[str, typer.Option(help=f"Wire dtype: {', '.join(FLOAT_WIRE_DTYPES)}.")] = "fp32",
    attention: Annotated[str, typer.Option(help=f"Attention: {', '.join(ATTENTION_IMPLEMENTATIONS)}.")] = "sdpa",
    tolerance: Annotated[float, typer.Option(help="Relative tolerance (applies to the fp32 wire).")] = 1e-5,
    rank: RankOpt = 16,
    cut_rank: CutRankOpt = 8,
) -> None:
    """Check that one split training step equals the unsplit PEFT model (loss and every LoRA gradient)."""
    from splitft.shared.model.equivalence import compare_split_to_whole

    console = new_console()
    try:
        report = compare_split_to_whole(
            model, cut, wire_dtype=wire, attn_implementation=attention, lora=LoraSettings(r=rank, r_cut=cut_rank)
        )
    except (ConfigError, ModelError) as exc:
        raise fail(exc) from exc
    console.print(
        f"{model} cut {cut} ({attention}, {wire} wire): loss whole {report.loss_whole:.6f}, "
        f"split {report.loss_split:.6f} (rel. error {report.loss_rel_error:.1e}); "
        f"worst LoRA gradient rel. error {report.max_grad_rel_error:.1e} over {report.num_weights} weights"
    )
    if wire != "fp32":
        console.print(f"(a {wire} wire is lossy: the errors above are what it costs, not a failure)")
        return
    if not report.within(tolerance):
        console.print(f"[red]MISMATCH[/red] above tolerance {tolerance:g} (worst: {report.worst_weight})")
        raise typer.Exit(int(ExitCode.CHECK_FAILED))
    console.print(f"[green]OK[/green]: split equals whole within {tolerance:g}")


def save_base(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder to write (a normal Hugging Face model folder).")],
    force: Annotated[
        bool, typer.Option("--force", help="Write into --out even if it holds files (same names are replaced).")
    ] = False,
) -> None:
    """Write a preset's base model (weights, config, tokenizer) as a normal Hugging Face folder."""
    try:
        check_out(out)
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ConfigError(f"--out {out} is not empty; choose a new folder, or pass --force to write into it")
        base = load_base_model(model)
        tokenizer = load_tokenizer(model)
        with staged(out) as staging:
            base.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except (ConfigError, ModelError) as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(out, exc)) from exc
    new_console().print(f"wrote {model} to {out}")


def import_model(
    source: Annotated[str, typer.Argument(help="A .gguf file, a Hugging Face model folder, or a preset.")],
    out: Annotated[Path, typer.Option("--out", help="The model folder to write.")],
    dtype: Annotated[str, typer.Option(help=f"Dtype of the weights written: {', '.join(DTYPES)}.")] = "fp32",
    force: Annotated[
        bool, typer.Option("--force", help="Write into --out even if it holds files (same names are replaced).")
    ] = False,
) -> None:
    """Write a model folder every device can use: safetensors weights, config, and the tokenizer with its chat
    template. A GGUF file (llama.cpp's format) is dequantized by transformers' GGUF loader; prints the model's
    fingerprint, which every device's copy must share."""
    console = new_console()
    try:
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
        check_out(out)
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ConfigError(f"--out {out} is not empty; choose a new folder, or pass --force to write into it")
        with staged(out) as staging:
            if is_gguf(source):
                convert(Path(source), staging, supported=MODEL_TYPES, dtype=dtype)
            else:
                load_base_model(source, dtype=DTYPES[dtype]).save_pretrained(staging)
                load_tokenizer(source).save_pretrained(staging)
        config = load_config(out)
        fingerprint = model_fingerprint(out)
        template = bool(getattr(load_tokenizer(out), "chat_template", None))
    except SplitFTError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(out, exc)) from exc
    console.print(
        f"wrote {escape(str(out))}: {config.model_type}, {num_layers(config)} blocks, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, {dtype}, chat template {'yes' if template else 'no'}\n"
        f"fingerprint {fingerprint}",
        soft_wrap=True,
    )


def generate_command(
    model: ModelOpt,
    adapter: AdapterOpt = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt to answer (repeatable).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Answer the prompts of this file (pairs or messages; JSONL, CSV, Parquet).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="With --data: its first N prompts.")] = 4,
    max_new_tokens: MaxNewTokensOpt = 256,
    chat_template: ChatTemplateOpt = "auto",
    out: Annotated[Path | None, typer.Option(help="Also write the answers here, as JSONL.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Greedy answers of a model (with an adapter, if given), its chat template applied as in training."""
    console = new_console()
    try:
        if (prompt is None) == (data is None):
            raise ConfigError("give --prompt (one or more) or --data, not both")
        template = chat_template_flag(chat_template)
        if data is not None:
            check_data_file(data)
            pairs = prompts_of(load_records(data, limit=limit), str(data))
        else:
            pairs = [(p, "") for p in prompt or []]
        where = torch_device(device)
        tokenizer = load_tokenizer(model)
        with console.status(f"loading {model} ..."):
            net = load_model(model, adapter, where)
        with console.status(f"answering {len(pairs)} prompt(s) ..."):
            answers = generate(
                net, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens, chat_template=template,
                device=where,
            )  # fmt: skip
        rows = [
            {"prompt": _shown(p), "answer": a, **({"reference": r} if r else {})}
            for (p, r), a in zip(pairs, answers, strict=True)
        ]
        if out is not None:
            out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    except SplitFTError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(out or Path("."), exc)) from exc
    for row in rows:
        console.print(f"[bold]prompt:[/bold] {escape(row['prompt'])}\n[bold]answer:[/bold] {escape(row['answer'])}\n")


def _shown(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{role}: {content}" for role, content in prompt)


def evaluate_command(
    model: ModelOpt,
    adapter: AdapterOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="Records to evaluate on (JSONL, CSV, Parquet) [default: GSM8K test].")
    ] = None,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens per example, at most (the job's max_length).")] = 256,
    samples: Annotated[int, typer.Option(min=1, help="The first N records (the job's eval_samples).")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 8,
    answers: Annotated[
        int, typer.Option(min=0, help="Also answer the first N prompts and score their final numbers (0: none).")
    ] = 16,
    max_new_tokens: MaxNewTokensOpt = 256,
    chat_template: ChatTemplateOpt = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Loss, perplexity and next-token accuracy over the answers of a data set, as the coordinator computes them
    after each round (same examples for the same max_length, samples and chat template); and the exact match
    of the final number of greedy answers (GSM8K's ``#### N``)."""
    console = new_console()
    source = data or GSM8K / "test.jsonl"
    try:
        template = chat_template_flag(chat_template)
        check_data_file(source)
        where = torch_device(device)
        tokenizer = load_tokenizer(model)
        examples = eval_examples(source, tokenizer, max_length, samples, template)
        with console.status(f"loading {model} ..."):
            net = load_model(model, adapter, where)
        pad = int(tokenizer.pad_token_id)
        batches = [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
        with console.status(f"evaluating {len(examples)} examples ..."):
            result = evaluate_lm(
                lambda i, m, y: logits_loss(net(input_ids=i, attention_mask=m).logits, y), batches, where
            )
        figures: dict[str, Any] = {
            "model": model, "adapter": None if adapter is None else str(adapter), "data": str(source),
            "examples": len(examples), "tokens": result.tokens, "loss": result.loss, "perplexity": result.perplexity,
            "accuracy": result.accuracy,
        }  # fmt: skip
        if answers:
            asked = prompts_of(load_records(source, limit=answers), str(source))
            with console.status(f"answering {len(asked)} prompts ..."):
                written = generate(
                    net, tokenizer, [p for p, _ in asked], max_new_tokens=max_new_tokens, chat_template=template,
                    device=where,
                )  # fmt: skip
            scores = score(written, [r for _, r in asked])
            figures |= {
                "problems": scores.problems,
                "exact_match": scores.exact_share,
                "formatted": scores.formatted_share,
            }
        if json_out is not None:
            json_out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    except SplitFTError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(json_out or Path("."), exc)) from exc
    table = Table(title=f"{model}{' + ' + str(adapter) if adapter else ''} on {source.name}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("examples / answer tokens", f"{len(examples)} / {result.tokens}")
    table.add_row("loss", f"{result.loss:.6f}")
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("next-token accuracy", f"{result.accuracy:.4f}")
    if answers:
        table.add_row(f"final number right ({figures['problems']} answers)", f"{figures['exact_match']:.1%}")
        table.add_row("answers in '#### N' form", f"{figures['formatted']:.1%}")
    console.print(table)


def report_comparison(console: Console, comparison: Comparison, metrics: Path, out: Path) -> dict[str, Any]:
    """Print the before/after table of a finished job (eval loss and perplexity from its metrics, answer scores
    from ``comparison``) and two answers side by side; write ``compare.json`` and ``answers.jsonl`` into ``out``."""
    rounds = read_metrics(metrics)
    first, last = rounds[0], rounds[-1]
    before, after = comparison.scores()
    figures = {
        "eval_loss": [first["eval_loss"], last["eval_loss"]],
        "eval_ppl": [first["eval_ppl"], last["eval_ppl"]],
        "exact_match": [before.exact_share, after.exact_share],
        "formatted": [before.formatted_share, after.formatted_share],
        "problems": before.problems,
    }
    table = Table(title=f"Before and after fine-tuning ({before.problems} held-out problems for the answers)")
    for column, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    loss_drop = 1 - last["eval_loss"] / first["eval_loss"]
    table.add_row("eval loss", f"{first['eval_loss']:.4f}", f"{last['eval_loss']:.4f}", f"{-loss_drop:+.1%}")
    table.add_row("eval perplexity", f"{first['eval_ppl']:.2f}", f"{last['eval_ppl']:.2f}", "")
    table.add_row("final number right", f"{before.exact_share:.1%}", f"{after.exact_share:.1%}", "")
    table.add_row("answers in '#### N' form", f"{before.formatted_share:.1%}", f"{after.formatted_share:.1%}", "")
    console.print(table)
    for row in comparison.rows()[:2]:
        side = Table(show_lines=True, title=escape(_shown(row["prompt"])), title_justify="left", expand=True)
        side.add_column("before")
        side.add_column("after")
        side.add_row(escape(row["before"]), escape(row["after"]))
        console.print(side)
    (out / "compare.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    (out / "answers.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in comparison.rows()), encoding="utf-8"
    )
    return figures


def unseal_command(
    adapter: Annotated[Path, typer.Option(help="The exported adapter of a job with private adapters.")],
    fleet_key_file: Annotated[Path, typer.Option(help="The fleet key the devices hold (make-fleet-key).")],
    out: Annotated[Path, typer.Option(help="The complete adapter folder to write (must not exist).")],
) -> None:
    """Complete the adapter of a job with private adapters: average the private blocks' sealed uploads kept in
    its private.json with the fleet key, as the devices do, and write a standard PEFT adapter folder. Run it
    where the fleet key may be, never on the coordinator's host."""
    console = new_console()
    try:
        if out.exists():
            raise ConfigError(f"--out {out} exists; give a new folder")
        unseal_adapter(adapter, load_fleet_key(fleet_key_file), out)
    except SplitFTError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(out, exc)) from exc
    console.print(f"adapter with its private blocks: {out}")
