"""`splitft-coordinator`: the command run on the GPU host.

This module is the typer app: the root options and the commands, each from its group's module:

- model (:mod:`.cli_model`): ``inspect``, ``verify-split``, ``save-base``, ``import``, ``generate``, ``evaluate``;
- data (:mod:`.cli_data`): ``partition``;
- jobs (:mod:`.cli_run`): ``make-key``, ``run``, ``worker``; (:mod:`.cli_local`): ``local``; what they share is
  in :mod:`.cli_jobs`;
- the privacy audit (:mod:`splitft.tools.audit.cli`): ``audit``.

Helpers of every command (one console, one way to fail, output folders written whole) are in :mod:`.cli_support`.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from splitft.coordinator.cli_data import partition
from splitft.coordinator.cli_local import local
from splitft.coordinator.cli_model import (
    evaluate_command,
    generate_command,
    import_model,
    inspect,
    save_base,
    unseal_command,
    verify_split,
)
from splitft.coordinator.cli_run import make_key, run, worker
from splitft.tools.audit.cli import audit

app = typer.Typer(
    help="SplitFT coordinator: runs the server segment of a split model and coordinates the edge agents.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more: every message refused, and why.")] = False,
) -> None:
    """SplitFT coordinator: runs the server segment of a split model and coordinates the edge agents."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)


# In this order in --help.
app.command("inspect")(inspect)
app.command("verify-split")(verify_split)
app.command("partition")(partition)
app.command("save-base")(save_base)
app.command("make-key")(make_key)
app.command("run")(run)
app.command("worker")(worker)
app.command("local")(local)
app.command("audit")(audit)
app.command("import")(import_model)
app.command("generate")(generate_command)
app.command("evaluate")(evaluate_command)
app.command("unseal")(unseal_command)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
