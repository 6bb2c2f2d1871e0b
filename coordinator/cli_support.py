"""What the coordinator's commands share: one console, one way to fail, output folders written whole,
and the options several commands declare alike."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from splitft.shared.errors import ConfigError, DataError, ExitCode, SplitFTError, exit_code_for
from splitft.shared.model.loading import PRESETS


def new_console() -> Console:
    # Made per command so that the width follows the terminal (and COLUMNS) at run time.
    return Console()


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help=f"Preset ({', '.join(PRESETS)}), Hugging Face model folder or .gguf file.")
]
CutOpt = Annotated[int, typer.Option("--cut", "-c", help="Cut layer c: the device runs blocks 0..c-1.")]
RankOpt = Annotated[int, typer.Option("--rank", help="LoRA rank of blocks away from the cut.")]
CutRankOpt = Annotated[int, typer.Option("--cut-rank", help="LoRA rank of the two blocks at the cut.")]


def fail(exc: Exception) -> typer.Exit:
    """Print one line, ``error: <what is wrong>``, on stderr; the exit code names the kind of problem."""
    code = exit_code_for(exc) if isinstance(exc, SplitFTError) else ExitCode.CONFIG
    # escape: messages name TOML tables ("[lora]") that rich would take for markup; soft_wrap: paths stay whole.
    Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(int(code))


# --------------------------------------------------------------------------- output folders


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out(out: Path, option: str = "--out") -> None:
    """The output folder must be a folder (or not exist yet) that we can write in."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out} exists and is not a folder")
    ancestor = existing_ancestor(out)
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: no permission to write in {ancestor}")


def new_folders(out: Path) -> list[Path]:
    """The folders that making ``out`` would create, deepest first."""
    made = []
    path = out.absolute()
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed command created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh temporary folder on ``out``'s file system to write into. When the block ends without an
    error, its files move into ``out`` (made if needed); when it fails, they are deleted and ``out`` is as
    it was: a failed command leaves no partial output and overwrites nothing."""
    check_out(out)
    staging = Path(tempfile.mkdtemp(prefix=".splitft-staging-", dir=existing_ancestor(out)))
    try:
        yield staging
        made = new_folders(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            for item in sorted(staging.iterdir()):
                os.replace(item, out / item.name)
        except OSError:
            remove_empty(made)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_error(out: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write to --out {out}: {exc.strerror or exc}")


def check_data_file(path: Path, option: str = "--data") -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder; {option} takes a JSONL or CSV file")
