"""`splitft-agent`: the command run on each edge device."""

from __future__ import annotations

import typer

app = typer.Typer(help="SplitFT edge agent: runs the client segment of a split model on this device.")


@app.callback()
def _root() -> None:
    """SplitFT edge agent."""


def main() -> None:
    app()
