"""The coordinator's data command: ``partition`` a data set across clients (length-based Dirichlet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from splitft.coordinator.cli_support import check_data_file, check_out, fail, new_console, staged, write_error
from splitft.shared.errors import SplitFTError


def partition(
    data: Annotated[Path, typer.Option(help="JSONL/CSV of prompt/response pairs to split.")],
    clients: Annotated[int, typer.Option(help="Number of shards.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards, the table and the PNG.")],
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration: 0.1 very skewed, 1000 close to IID.")] = 0.5,
    buckets: Annotated[int, typer.Option(help="Length buckets (quantiles).")] = 4,
    min_samples: Annotated[int, typer.Option(help="Samples every client gets at least.")] = 2,
    model: Annotated[str, typer.Option("--model", "-m", help="Whose tokenizer measures the lengths.")] = "tiny-gpt2",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N records.")] = None,
) -> None:
    """Split a data set across clients by a length-based Dirichlet partition; shards, a table and a PNG."""
    from splitft.shared.job.partition import (
        describe,
        length_dirichlet_partition,
        plot_partition,
        token_lengths,
        write_partition,
    )
    from splitft.shared.job.records import load_records
    from splitft.shared.model.tokenizer import load_tokenizer

    console = new_console()
    try:
        check_out(out)
        check_data_file(data)
        records = load_records(data, limit=limit)
        lengths = token_lengths(records, load_tokenizer(model))
        split = length_dirichlet_partition(
            lengths, clients, alpha, num_buckets=buckets, min_samples=min_samples, seed=seed
        )
        with staged(out) as staging:
            written = write_partition(records, split, staging)
            plot_partition(
                split, lengths, staging / "partition.png", title=f"{data.name}: alpha={alpha}, {clients} clients"
            )
    except SplitFTError as exc:
        raise fail(exc) from exc
    except OSError as exc:
        raise fail(write_error(out, exc)) from exc
    paths = [out / path.name for path in written]
    png = out / "partition.png"
    table = Table(title=f"Length-Dirichlet partition (alpha={alpha}, skew {split.skew():.3f})")
    for column in ("client", "file", "samples", "mean len", "median", "p90", "per bucket (short..long)"):
        table.add_column(column)
    for row, path in zip(describe(split, lengths), paths, strict=True):
        table.add_row(
            str(row["client"]), path.name, str(row["samples"]), f"{row['mean']:.0f}", f"{row['median']:.0f}",
            f"{row['p90']:.0f}", " ".join(map(str, row["buckets"])),
        )  # fmt: skip
    console.print(table)
    console.print(f"shards in {out}; histogram {png}")
