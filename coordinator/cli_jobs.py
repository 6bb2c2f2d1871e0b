"""What the job commands (``run``, ``worker``, ``local``) share: their common options, the checks before a job
starts, the job's observers, and the progress shown on the terminal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from splitft.coordinator.cli_support import check_data_file, check_out
from splitft.coordinator.progress import Event
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Job TOML file (see README); flags override it.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder: metrics, checkpoints, adapter, plot.")]
DeviceOpt = Annotated[str, typer.Option(help="Torch device of the server segment: auto, cpu, cuda.")]
DashboardTokenOpt = Annotated[
    str | None,
    typer.Option(
        envvar="SPLITFT_DASHBOARD_TOKEN",
        help="A secret the dashboard and /metrics want (?token=... or Authorization: Bearer ...); "
        "give one when --dashboard listens beyond 127.0.0.1.",
    ),
]
TensorBoardOpt = Annotated[
    Path | None, typer.Option("--tensorboard", help="Write the per-round scalars for TensorBoard into this folder.")
]


def build_observatory(
    spec: JobConfig, console: Console, dashboard: str, token: str | None, tensorboard: Path | None, *, default: bool
) -> Any:
    """The job's observers (see coordinator/observe/), its flags checked: a ConfigError names the bad one.
    ``default``: ``dashboard`` is the command's default, and a taken port falls back to a free one."""
    from splitft.coordinator.observe.dashboard import Observatory, parse_address
    from splitft.coordinator.observe.tensorboard import check_writable

    address = parse_address(dashboard, fallback=default)
    if tensorboard is not None:
        check_writable(tensorboard)
    return Observatory(
        spec, dashboard=address, token=token, tensorboard=tensorboard, forward=ProgressView(console, spec)
    )


async def observed(observatory: Any, console: Console, job: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run ``job`` with its observers: the dashboard is bound first (a port in use fails before the job)."""
    async with observatory:
        if observatory.url is not None:
            console.print(f"dashboard: {observatory.url}  (Prometheus: {observatory.url.split('?')[0]}metrics)")
        return await job()


def preflight(spec: JobConfig, out: Path, cuts: Sequence[int] = ()) -> None:
    """Check what a job needs before anything is written or connected: the output folder, the model (its
    config, tokenizer and weights), the cuts against its blocks, and the evaluation data."""
    from splitft.shared.job.data import eval_examples
    from splitft.shared.model.loading import check_max_length, check_weights, load_config, num_layers
    from splitft.shared.model.tokenizer import GSM8K, load_tokenizer

    check_out(out)
    config = load_config(spec.model, spec.attn_implementation)
    tokenizer = load_tokenizer(spec.model)
    check_weights(spec.model, config)  # safetensors weights, and the ones its config describes
    layers = num_layers(config)
    spec.check_cuts(layers)
    check_max_length(config, spec.max_length)
    for cut in cuts:
        if not 1 <= cut <= layers - 1:
            raise ConfigError(f"--cuts: cut {cut} is outside the model's cut layers 1..{layers - 1}")
    if spec.eval_data is not None:
        check_data_file(Path(spec.eval_data), "eval_data")
    eval_examples(
        spec.eval_data or GSM8K / "test.jsonl", tokenizer, spec.max_length, spec.eval_samples, spec.chat_template
    )


class ProgressView:
    """Renders the coordinator's progress events: a bar over all steps and a line per round. The bar counts the
    steps of the rounds before the current one and of its current attempt, never past the job's total."""

    def __init__(self, console: Console, job: JobConfig) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task = self.progress.add_task("waiting for agents", total=job.rounds * job.local_steps)
        self.job = job
        self.started = False

    def __call__(self, event: Event, data: dict[str, Any]) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if event == Event.WAITING:
            self.progress.update(self.task, description=f"waiting for agents ({len(data['online'])}/{data['needed']})")
        elif event == Event.ROUND_START:
            tails = data.get("tails") or {}
            cuts = " ".join(f"{n}:{c}" + (f"+{tails[n]}" if n in tails else "") for n, c in data["cuts"].items())
            # The steps before this round, whatever ran before: a retried attempt or a resume starts it again.
            done = (data["round"] - 1) * self.job.local_steps
            self.progress.update(
                self.task, completed=done, description=f"round {data['round']}/{self.job.rounds}  cuts {cuts}"
            )
        elif event == Event.STEP:
            self.progress.update(self.task, completed=(data["round"] - 1) * self.job.local_steps + data["step"])
        elif event == Event.RESUMED:
            self.console.print(
                f"resumed from {data['checkpoint']} at round {data['round']} (state digest {data['digest']} verified)"
            )
        elif event == Event.WORKER_LOST:
            self.console.print(
                f"[red]round {data['round']:>3}: a coordinator worker is gone[/red] ({escape(data['error'])}); "
                "the job goes on with every device on this process"
            )
        elif event == Event.ROUND_RETRY and data.get("reason") == "worker_lost":
            self.console.print(f"round {data['round']:>3}: attempt {data['attempt']} rolled back, running it again")
        elif event == Event.ROUND_RETRY:
            self.console.print(
                f"round {data['round']:>3}: fewer than {self.job.min_agents} agents finished attempt "
                f"{data['attempt']}; rolled back, running it again"
            )
        elif event == Event.ROUND_END:
            self.console.print(
                f"round {data['round']:>3}: eval loss {data['eval_loss']:.4f}  ppl {data['eval_ppl']:.1f}  "
                f"acc {data['eval_acc']:.3f}  train loss {_number(data['train_loss'])}  "
                f"round {data['round_time_s']:.1f} s  up {data['bytes_up'] / 1e6:.1f} MB  "
                f"down {data['bytes_down'] / 1e6:.1f} MB"
            )
        elif event == Event.DONE:
            self.progress.stop()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
