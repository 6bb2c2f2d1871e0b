#!/usr/bin/env python3
"""The chaos soak (splitft.bench.chaos): federated jobs back to back on a local Mosquitto for a set time, with
agents and the coordinator killed and restarted (--resume), the broker restarted, garbage and forged uploads on
the job's topics; each job's adapter compared bit for bit with an uninterrupted reference run.

    python scripts/chaos.py                      # 30 minutes, keyed and unkeyed jobs in turn, into runs/chaos/
    python scripts/chaos.py --minutes 3 --seed 1 --out runs/chaos-3
    python scripts/chaos.py --key                # keyed jobs only (--no-key: unkeyed only)

Writes summary.json, summary.md and events.jsonl to --out; exits 1 unless every job finished with an adapter
equal to the reference and every refusal was counted."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from splitft.shared.cli_options import check_choices, run_app

app = typer.Typer(add_completion=False)


@app.command(help=(__doc__ or "").split("\n\n")[0] + "\n\n" + (__doc__ or "").split("\n\n")[-1])
def chaos(
    minutes: Annotated[float, typer.Option("--minutes", min=0, help="no job starts after this")] = 30.0,
    seed: Annotated[int, typer.Option("--seed", help="the faults' choices and timings, the data and the job")] = 0,
    out: Annotated[Path, typer.Option("--out", help="results folder")] = Path("runs/chaos"),
    key: Annotated[
        bool | None, typer.Option("--key/--no-key", help="only jobs with a job key, or only without (default: both)")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=2, help="rounds per job")] = 5,
    local_steps: Annotated[int, typer.Option("--local-steps", min=1)] = 3,
    split: Annotated[str, typer.Option("--split", help="u or two-part")] = "u",
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads of every process")] = 1,
    fault_rate: Annotated[
        float, typer.Option("--fault-rate", min=0, max=1, help="chance a round gets a process fault")
    ] = 0.7,
) -> int:
    from splitft.bench.chaos import ChaosSettings, run_soak

    check_choices("--split", split, ("u", "two-part"))
    modes = (False, True) if key is None else (key,)
    settings = ChaosSettings(
        out=out, minutes=minutes, seed=seed, modes=modes, rounds=rounds, local_steps=local_steps, split=split,
        threads=threads, fault_rate=fault_rate,
    )  # fmt: skip
    summary = run_soak(settings)
    print((out / "summary.md").read_text())
    return 0 if summary["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_app(app, argv)


if __name__ == "__main__":
    sys.exit(main())
