"""`splitft-coordinator`: the command run on the GPU host."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from splitft.shared.codec import FLOAT_WIRE_DTYPES
from splitft.shared.errors import ConfigError, ModelError
from splitft.shared.exit_codes import ExitCode
from splitft.shared.lora import LoraSettings
from splitft.shared.models import ATTENTION_IMPLEMENTATIONS, PRESETS

app = typer.Typer(
    help="SplitFT coordinator: runs the server segment of a split model and coordinates the edge agents.",
    no_args_is_help=True,
    add_completion=False,
)


def _console() -> Console:
    # Made per command so that the width follows the terminal (and COLUMNS) at run time.
    return Console()


ModelOpt = Annotated[str, typer.Option("--model", "-m", help=f"Preset ({', '.join(PRESETS)}) or local model folder.")]
CutOpt = Annotated[int, typer.Option("--cut", "-c", help="Cut layer c: the device runs blocks 0..c-1.")]
RankOpt = Annotated[int, typer.Option("--rank", help="LoRA rank of blocks away from the cut.")]
CutRankOpt = Annotated[int, typer.Option("--cut-rank", help="LoRA rank of the two blocks at the cut.")]


def _fail(exc: Exception) -> typer.Exit:
    code = ExitCode.MODEL if isinstance(exc, ModelError) else ExitCode.CONFIG
    _console().print(f"[red]error:[/red] {exc}")
    return typer.Exit(int(code))


@app.command()
def inspect(model: ModelOpt, cut: CutOpt, rank: RankOpt = 16, cut_rank: CutRankOpt = 8) -> None:
    """Print the split plan: what each side holds, the LoRA ranks, and the activation bytes per token."""
    from splitft.shared.plan import plan_split

    console = _console()
    try:
        plan = plan_split(model, cut, LoraSettings(r=rank, r_cut=cut_rank))
    except (ConfigError, ModelError) as exc:
        raise _fail(exc) from exc
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


@app.command("verify-split")
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
    from splitft.shared.equivalence import compare_split_to_whole

    console = _console()
    try:
        report = compare_split_to_whole(
            model, cut, wire_dtype=wire, attn_implementation=attention, lora=LoraSettings(r=rank, r_cut=cut_rank)
        )
    except (ConfigError, ModelError) as exc:
        raise _fail(exc) from exc
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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
