"""`splitft-coordinator`: the command run on the GPU host."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from splitft.agent.cli import AuthKeyFileOpt, AuthWindowOpt, CaFileOpt, CertFileOpt, KeyFileOpt
from splitft.coordinator import answers
from splitft.coordinator.cli_support import (
    CutOpt,
    CutRankOpt,
    ModelOpt,
    RankOpt,
    check_data_file,
    check_out,
    fail,
    new_console,
    new_folders,
    remove_empty,
    staged,
    write_error,
)
from splitft.coordinator.model_cli import (
    chat_template_flag,
    evaluate_command,
    generate_command,
    import_model,
    report_comparison,
)
from splitft.shared.errors import ConfigError, ExitCode, ModelError, SplitFTError
from splitft.shared.job.config import JobConfig, torch_device
from splitft.shared.model.loading import ATTENTION_IMPLEMENTATIONS
from splitft.shared.model.lora import LoraSettings
from splitft.shared.wire.broker import broker_settings
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES

app = typer.Typer(
    help="SplitFT coordinator: runs the server segment of a split model and coordinates the edge agents.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
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


@app.command()
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
    from rich.table import Table

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


@app.command("save-base")
def save_base(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder to write (a normal Hugging Face model folder).")],
    force: Annotated[
        bool, typer.Option("--force", help="Write into --out even if it holds files (same names are replaced).")
    ] = False,
) -> None:
    """Write a preset's base model (weights, config, tokenizer) as a normal Hugging Face folder."""
    from splitft.shared.model.split import load_base_model
    from splitft.shared.model.tokenizer import load_tokenizer

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


@app.command("make-key")
def make_key(
    out: Annotated[Path, typer.Option("--out", help="The key file to write, e.g. job.key.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the file if it exists (members holding the old key can no longer talk)."),
    ] = False,
) -> None:
    """Write a new job key: 32 random bytes as hex, readable only by you (mode 0600).

    Give the same file to the coordinator and to every agent with --auth-key-file: each message is
    then signed with it, and messages not signed with it are refused. Keep it secret. An existing
    file is never overwritten unless --force is given."""
    import secrets

    try:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give the path of the key file to write")
        if (out.exists() or out.is_symlink()) and not force:
            raise ConfigError(
                f"{out} already exists; not overwriting it (the coordinator and agents using it would stop "
                "understanding each other). Pass --force to replace it."
            )
        if not out.parent.is_dir():
            raise ConfigError(f"cannot write {out}: the folder {out.parent} does not exist")
        _write_private(out, secrets.token_hex(32) + "\n", replace=force)
    except ConfigError as exc:
        raise fail(exc) from exc
    except FileExistsError as exc:  # made by someone else since the check above
        raise fail(ConfigError(f"{out} already exists; not overwriting it. Pass --force to replace it.")) from exc
    except OSError as exc:
        raise fail(ConfigError(f"cannot write the key file {out}: {exc.strerror or exc}")) from exc
    new_console().print(
        f"wrote a new job key to {out} (mode 0600). Give it to the coordinator and every agent with "
        "--auth-key-file; keep it secret.",
        soft_wrap=True,
    )


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte on.

    Without ``replace`` the file must not exist (O_EXCL: never clobbered, even in a race); with it, a
    complete new file replaces the old one atomically."""
    if not replace:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    from splitft.shared.job.data import write_text_atomic

    write_text_atomic(path, text)  # through a temp file made with mode 0600


# --------------------------------------------------------------------------- running jobs

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Job TOML file (see README); flags override it.")]
BrokerOpt = Annotated[
    str, typer.Option(envvar="SPLITFT_BROKER", help="Broker URL: mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS.")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder: metrics, checkpoints, adapter, plot.")]
DeviceOpt = Annotated[str, typer.Option(help="Torch device of the server segment: auto, cpu, cuda.")]
UsernameOpt = Annotated[str | None, typer.Option(envvar="SPLITFT_USERNAME", help="Broker user name.")]
PasswordOpt = Annotated[str | None, typer.Option(envvar="SPLITFT_PASSWORD", help="Broker password.")]
MqttProtocolOpt = Annotated[str, typer.Option(help="MQTT version: 5, or 3.1.1.")]
ConnectTimeoutOpt = Annotated[float, typer.Option(help="Seconds to reach the broker at start-up.")]
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

WorkerTimeoutOpt = Annotated[
    float,
    typer.Option(
        help="Seconds a worker collective may wait for the others (rank 0 admitting and evaluating included)."
    ),
]


def _job(config: Path | None, **overrides: Any) -> JobConfig:
    base = JobConfig.from_toml(config) if config is not None else JobConfig()
    return base.with_overrides(**overrides)


#: what `local` runs without a job file: a short demo that visibly learns (the job file's defaults are for `run`)
LOCAL_DEFAULTS: dict[str, Any] = {
    "job": "local", "rounds": 6, "local_steps": 4, "batch_size": 4, "max_length": 192, "policy": "splitft",
    "lr": 2e-3, "split": "u", "plan_first_round": False,  # --cuts are round 1's cuts
}  # fmt: skip


def local_job(config: Path | None, **flags: Any) -> JobConfig:
    """The job `local` runs: the flags given win, then the job file; without a file, :data:`LOCAL_DEFAULTS`."""
    if config is None:
        flags = {k: LOCAL_DEFAULTS[k] if flags.get(k) is None and k in LOCAL_DEFAULTS else v for k, v in flags.items()}
        flags["job"] = LOCAL_DEFAULTS["job"]
    base = JobConfig.from_toml(config) if config is not None else JobConfig()
    lr = flags.pop("lr", None)
    if lr is not None:
        flags["optimizer"] = replace(base.optimizer, lr=lr)
    return base.with_overrides(**flags)


def _observatory(
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
        spec, dashboard=address, token=token, tensorboard=tensorboard, forward=_ProgressView(console, spec)
    )


async def _observed(observatory: Any, console: Console, job: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run ``job`` with its observers: the dashboard is bound first (a port in use fails before the job)."""
    async with observatory:
        if observatory.url is not None:
            console.print(f"dashboard: {observatory.url}  (Prometheus: {observatory.url.split('?')[0]}metrics)")
        return await job()


def _preflight(spec: JobConfig, out: Path, cuts: Sequence[int] = ()) -> None:
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


@app.command()
def run(
    broker: BrokerOpt,
    out: OutOpt,
    config: ConfigOpt = None,
    job: Annotated[str | None, typer.Option(envvar="SPLITFT_JOB", help="Job name.")] = None,
    model: Annotated[str | None, typer.Option(help="Preset, Hugging Face model folder or .gguf file.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds.")] = None,
    min_agents: Annotated[int | None, typer.Option(help="Agents needed before a round starts.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    username: UsernameOpt = None,
    password: PasswordOpt = None,
    ca_file: CaFileOpt = None,
    cert_file: CertFileOpt = None,
    key_file: KeyFileOpt = None,
    auth_key_file: AuthKeyFileOpt = None,
    auth_window: AuthWindowOpt = 300.0,
    mqtt_protocol: MqttProtocolOpt = "5",
    connect_timeout: ConnectTimeoutOpt = 30.0,
    device: DeviceOpt = "auto",
    dashboard: Annotated[
        str, typer.Option(help="Serve the live dashboard and /metrics on [HOST:]PORT (HOST: 127.0.0.1), or off.")
    ] = "off",
    dashboard_token: DashboardTokenOpt = None,
    tensorboard: TensorBoardOpt = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Coordinator workers sharing the server segment (this process is rank 0).")
    ] = 1,
    rendezvous: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT this process hosts the workers' rendezvous on; given, it starts no workers itself: "
            "start `splitft-coordinator worker` on the other hosts. Default: 127.0.0.1, workers started here."
        ),
    ] = None,
    worker_timeout: WorkerTimeoutOpt = 1800.0,
) -> None:
    """Coordinate a job: admit agents, run the rounds, write metrics, checkpoints and the final adapter.

    The job file, the options, the model and the evaluation data are checked first: if any is wrong,
    the command says which and stops before it connects or writes anything."""
    from splitft.coordinator.brokers import free_port
    from splitft.coordinator.runtime import Coordinator
    from splitft.coordinator.workers import WorkerGroup, start_local_workers, stop_local_workers

    console = new_console()
    try:
        spec = _job(config, job=job, model=model, rounds=rounds, min_agents=min_agents)
        settings = broker_settings(
            broker,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            auth_key_file=auth_key_file,
            auth_window_s=auth_window,
            protocol=mqtt_protocol,
            connect_timeout_s=connect_timeout,
        )
        server_device = torch_device(device)
        _preflight(spec, out)
        observatory = _observatory(spec, console, dashboard, dashboard_token, tensorboard, default=False)
        if rendezvous is not None and workers < 2:
            raise ConfigError("--rendezvous is for --workers 2 or more")
        address = rendezvous or f"127.0.0.1:{free_port()}"
        group = WorkerGroup(0, workers, address, timeout_s=worker_timeout) if workers > 1 else None
    except SplitFTError as exc:
        raise fail(exc) from exc
    processes = []
    if group is not None and rendezvous is None:
        worker_args = _broker_args(
            broker, username=username, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            auth_key_file=auth_key_file, auth_window=auth_window, mqtt_protocol=mqtt_protocol,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        worker_args += ["--device", server_device, "--worker-timeout", str(worker_timeout)]
        env = {"SPLITFT_PASSWORD": password} if password is not None else {}  # not on a command line
        processes = start_local_workers(workers, address, worker_args, env)
        console.print(f"workers: rank 0 here, {_ranks(workers)} started on this host ({address})")
    elif group is not None:
        console.print(f"workers: rank 0 here; waiting for {_ranks(workers)} at {address}")
    if not spec.u_split:
        console.print(
            "[yellow]two-part split:[/yellow] every step's activations carry the devices' labels (their response "
            'tokens) to this host; split = "u" in the job file keeps tokens and labels on the devices.'
        )
    made = new_folders(out)  # removed again if the run fails before writing anything in them
    try:
        coordinator = Coordinator(
            spec, settings, out, resume=resume, device=server_device, progress=observatory, workers=group,
            worker_processes=processes,
        )  # fmt: skip
        summary = asyncio.run(_observed(observatory, console, coordinator.run))
    except SplitFTError as exc:
        remove_empty(made)
        raise fail(exc) from exc
    except KeyboardInterrupt:
        remove_empty(made)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    finally:
        stop_local_workers(processes)
    from splitft.coordinator.report import plot_run

    metrics = Path(summary["metrics"])
    lines = [f"adapter: {summary['adapter']}", f"metrics: {metrics}"]
    if metrics.is_file():
        lines.append(f"plot:    {plot_run(metrics, out / 'run.png', title=f'SplitFT run: {spec.job}')}")
    console.print("\n".join(lines))


def _ranks(workers: int) -> str:
    return "rank 1" if workers == 2 else f"ranks 1..{workers - 1}"


def _broker_args(broker: str, **options: Any) -> list[str]:
    """The broker options of `run` again, for the `worker` processes it starts (the password goes by
    SPLITFT_PASSWORD, not on a command line)."""
    args = ["--broker", broker]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@app.command()
def worker(
    broker: BrokerOpt,
    rendezvous: Annotated[str, typer.Option(help="HOST:PORT of rank 0's rendezvous (its `run --rendezvous`).")],
    rank: Annotated[int, typer.Option(min=1, help="This worker's rank: 1..workers-1, each once.")],
    workers: Annotated[int, typer.Option(min=2, help="Workers in all, rank 0 included (its `run --workers`).")],
    username: UsernameOpt = None,
    password: PasswordOpt = None,
    ca_file: CaFileOpt = None,
    cert_file: CertFileOpt = None,
    key_file: KeyFileOpt = None,
    auth_key_file: AuthKeyFileOpt = None,
    auth_window: AuthWindowOpt = 300.0,
    mqtt_protocol: MqttProtocolOpt = "5",
    connect_timeout: ConnectTimeoutOpt = 30.0,
    device: DeviceOpt = "auto",
    worker_timeout: WorkerTimeoutOpt = 1800.0,
) -> None:
    """Serve a share of a job's devices for the coordinator `run --workers N` (rank 0): the server segment
    of the agents rank 0 gives this worker, its gradients all-reduced with the other workers'.

    It needs the job's model at the same path (or preset) as rank 0, the broker, and the job's message key;
    the job itself comes from rank 0. It ends when the job does."""
    from splitft.coordinator.workers import WorkerGroup, run_worker

    try:
        settings = broker_settings(
            broker, username=username, password=password, ca_file=ca_file, cert_file=cert_file,
            key_file=key_file, auth_key_file=auth_key_file, auth_window_s=auth_window, protocol=mqtt_protocol,
            connect_timeout_s=connect_timeout,
        )  # fmt: skip
        group = WorkerGroup(rank, workers, rendezvous, timeout_s=worker_timeout)
        asyncio.run(run_worker(group, settings, torch_device(device)))
    except SplitFTError as exc:
        raise fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


@app.command()
def local(
    out: OutOpt = Path("runs/local"),
    config: ConfigOpt = None,
    model: Annotated[
        str | None, typer.Option(help="Preset, Hugging Face model folder or .gguf file [default: tiny-gpt2].")
    ] = None,
    agents: Annotated[int, typer.Option(help="Agent processes to start.")] = 3,
    cuts: Annotated[
        str, typer.Option(help="First-round cut layers, given to the agents in turn (without --config: every policy).")
    ] = "1,2,3",
    rounds: Annotated[int | None, typer.Option(help="Rounds [default: 6, or the job file's].")] = None,
    local_steps: Annotated[
        int | None, typer.Option(help="Steps per agent per round [default: 4, or the job file's].")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences per step per agent [default: 4, or the job file's].")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per sequence, at most [default: 192, or the job file's].")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [default: 2e-3 (AdamW), or the job file's].")] = None,
    samples_per_agent: Annotated[int, typer.Option(help="Training samples per agent.")] = 96,
    alpha: Annotated[
        float, typer.Option(help="Length-based Dirichlet partition of the data (0.1 very skewed; 0 = IID split).")
    ] = 1.0,
    data: Annotated[
        Path | None,
        typer.Option(help="JSONL/CSV/Parquet of text, prompt/completion or messages to shard (default: GSM8K)."),
    ] = None,
    prompt_field: Annotated[
        str | None, typer.Option(help="--data's prompt field (default: prompt, question or instruction).")
    ] = None,
    response_field: Annotated[
        str | None, typer.Option(help="--data's response field (default: response, answer or output).")
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="JSONL/CSV evaluated after every round [default: the job file's, or GSM8K test]."),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="Cut policy: fixed, paper, latency, splitft [default: splitft, or the job file's]."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="u (default unless --config says otherwise): the agents also hold the last --tail blocks and the "
            "head, so no token or label leaves them; two-part: the coordinator computes the loss (it gets the labels)."
        ),
    ] = None,
    tail: Annotated[int | None, typer.Option(help="U split: blocks at the top of the model each agent holds.")] = None,
    emulate: Annotated[
        str, typer.Option(help="Device profiles the agents emulate, in turn ('' for none).")
    ] = "jetson-nano,jetson-orin-nano,laptop",
    emulate_scale: Annotated[
        float,
        typer.Option(
            help="Scale the emulated devices' compute (0.01 makes a tiny model's devices as slow as real ones)."
        ),
    ] = 1.0,
    base_dtype: Annotated[
        str | None,
        typer.Option(help="The server's frozen weights: fp32, bf16, fp16 [default: the job file's, or fp32]."),
    ] = None,
    device_dtype: Annotated[
        str | None,
        typer.Option(help="Every agent's frozen weights: fp32, bf16, fp16 [default: each emulated profile's dtype]."),
    ] = None,
    broker: Annotated[str | None, typer.Option(help="Use this broker instead of the embedded one.")] = None,
    mqtt_protocol: Annotated[str, typer.Option(help="MQTT version of --broker: 5, or 3.1.1.")] = "5",
    device: DeviceOpt = "auto",
    dashboard: Annotated[
        str,
        typer.Option(
            help="Serve the live dashboard and /metrics on [HOST:]PORT (HOST: 127.0.0.1), or off "
            "[default: 127.0.0.1:8765, or a free port if that one is taken]."
        ),
    ] = "",
    dashboard_token: DashboardTokenOpt = None,
    tensorboard: TensorBoardOpt = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Coordinator workers sharing the server segment, as processes here.")
    ] = 1,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="Pairs and messages through the tokenizer's chat template: auto, true, false [default: auto]."
        ),
    ] = None,
    compare: Annotated[
        int,
        typer.Option(
            min=0, help="At the end, answer the first N eval problems with the base model and the adapter (0: skip)."
        ),
    ] = 16,
    compare_tokens: Annotated[int, typer.Option(min=1, help="Tokens each of those answers may have.")] = 256,
) -> None:
    """One command, one machine: broker, coordinator and several agents with different cut layers
    fine-tune a model on GSM8K shards; ends with the adapter folder, metrics.jsonl and run.png."""
    from splitft.coordinator.local import LocalRun, run_local
    from splitft.shared.job.records import load_records
    from splitft.shared.model.precision import torch_dtype
    from splitft.shared.model.tokenizer import GSM8K
    from splitft.shared.profiles import load_profile
    from splitft.shared.wire.broker import BrokerSettings

    console = new_console()
    try:
        spec = local_job(
            config, model=model, rounds=rounds, local_steps=local_steps, batch_size=batch_size,
            max_length=max_length, policy=policy, lr=lr, split=split, tail=tail,
            eval_data=None if eval_data is None else str(eval_data), plan_first_round=None,
            chat_template=None if chat_template is None else chat_template_flag(chat_template), base_dtype=base_dtype,
        )  # fmt: skip
        if device_dtype is not None:
            torch_dtype(device_dtype, "--device-dtype")
        try:
            cut_list = tuple(int(c) for c in cuts.split(",") if c.strip())
        except ValueError:
            raise ConfigError(f"--cuts must be cut layers separated by commas, e.g. 1,2,3; got {cuts!r}") from None
        profiles = tuple(p.strip() for p in emulate.split(",") if p.strip())
        for name in profiles:
            try:
                load_profile(name)  # an unknown profile fails here, not in every agent process
            except ConfigError as exc:
                raise ConfigError(f"--emulate: {exc}") from exc
        if not (math.isfinite(emulate_scale) and emulate_scale > 0):
            raise ConfigError(f"--emulate-scale must be a positive number, got {emulate_scale}")
        if broker is not None:
            BrokerSettings(url=broker, protocol=mqtt_protocol)
        if (prompt_field is None) != (response_field is None):
            raise ConfigError("--prompt-field and --response-field must be given together")
        if data is not None:
            check_data_file(data)
            load_records(data, prompt_field, response_field, limit=1)
        elif prompt_field is not None:
            raise ConfigError("--prompt-field and --response-field name the fields of --data, which is not given")
        plan = LocalRun(
            spec, out, agents=agents, cuts=cut_list, samples_per_agent=samples_per_agent, data=data, alpha=alpha or None,
            prompt_field=prompt_field, response_field=response_field,
            broker_url=broker, mqtt_protocol=mqtt_protocol, device=torch_device(device),
            emulate=profiles, emulate_scale=emulate_scale, workers=workers, device_dtype=device_dtype,
        )  # fmt: skip
        _preflight(spec, out, cut_list)
        from splitft.coordinator.observe.dashboard import LOCAL_DEFAULT

        observatory = _observatory(
            spec, console, dashboard or LOCAL_DEFAULT, dashboard_token, tensorboard, default=not dashboard
        )
    except SplitFTError as exc:
        raise fail(exc) from exc
    layout = f"U split, tail {spec.tail}" if spec.u_split else "two-part split"
    console.print(
        f"[bold]SplitFT local run[/bold]: {agents} agents (cuts {', '.join(map(str, cut_list))}; {layout}), "
        f"model {spec.model}, {spec.rounds} rounds x {spec.local_steps} steps; output in {out}"
    )
    made = new_folders(out)
    try:
        summary = asyncio.run(_observed(observatory, console, lambda: run_local(plan, progress=observatory)))
    except SplitFTError as exc:
        remove_empty(made)
        raise fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    console.print(f"adapter: {summary['adapter']}\nmetrics: {summary['metrics']}\nplot:    {summary['plot']}")
    if compare:
        try:
            with console.status(f"answering {compare} held-out problems with the base model and with the adapter ..."):
                comparison = answers.compare(
                    spec.model, Path(summary["adapter"]), Path(spec.eval_data or GSM8K / "test.jsonl"), compare,
                    chat_template=spec.chat_template, max_new_tokens=compare_tokens, device=plan.device,
                )  # fmt: skip
            report_comparison(console, comparison, Path(summary["metrics"]), out)
        except SplitFTError as exc:
            raise fail(exc) from exc


class _ProgressView:
    """Renders the coordinator's progress events: a bar over all steps and a line per round."""

    def __init__(self, console: Console, job: JobConfig) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.task = self.progress.add_task("waiting for agents", total=job.rounds * job.local_steps)
        self.job = job
        self.started = False

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if event == "waiting":
            self.progress.update(self.task, description=f"waiting for agents ({len(data['online'])}/{data['needed']})")
        elif event == "round_start":
            tails = data.get("tails") or {}
            cuts = " ".join(f"{n}:{c}" + (f"+{tails[n]}" if n in tails else "") for n, c in data["cuts"].items())
            self.progress.update(self.task, description=f"round {data['round']}/{self.job.rounds}  cuts {cuts}")
        elif event == "step":
            self.progress.advance(self.task)
        elif event == "resumed":
            self.console.print(
                f"resumed from {data['checkpoint']} at round {data['round']} (state digest {data['digest']} verified)"
            )
        elif event == "worker_lost":
            self.console.print(
                f"[red]round {data['round']:>3}: a coordinator worker is gone[/red] ({escape(data['error'])}); "
                "the job goes on with every device on this process"
            )
        elif event == "round_retry" and data.get("reason") == "worker_lost":
            self.console.print(f"round {data['round']:>3}: attempt {data['attempt']} rolled back, running it again")
        elif event == "round_retry":
            self.console.print(
                f"round {data['round']:>3}: fewer than {self.job.min_agents} agents finished attempt "
                f"{data['attempt']}; rolled back, running it again"
            )
        elif event == "round_end":
            self.console.print(
                f"round {data['round']:>3}: eval loss {data['eval_loss']:.4f}  ppl {data['eval_ppl']:.1f}  "
                f"acc {data['eval_acc']:.3f}  train loss {_number(data['train_loss'])}  "
                f"round {data['round_time_s']:.1f} s  up {data['bytes_up'] / 1e6:.1f} MB  "
                f"down {data['bytes_down'] / 1e6:.1f} MB"
            )
        elif event == "done":
            self.progress.stop()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command()
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
    finetune_steps: Annotated[
        int, typer.Option(help="Fine-tune LoRA through the split with the defense on (per cut) before attacking.")
    ] = 0,
    adapter: Annotated[
        Path | None, typer.Option(help="Attack these client adapters (a PEFT adapter folder) instead of the base.")
    ] = None,
    tails: Annotated[
        str, typer.Option(help="U-split label leakage: device tail sizes k, e.g. '0,1,2'; '' skips.")
    ] = "0,1",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Privacy audit as the server would attack: token recovery from the activations at each cut
    (plain and defended) and label recovery from the U-shaped split's returned gradients."""
    from safetensors.torch import load_file

    from splitft.shared.model.defense import DefenseSettings
    from splitft.shared.model.loading import hidden_size, load_config, num_layers
    from splitft.shared.model.lora import lora_state
    from splitft.shared.model.tokenizer import load_tokenizer
    from splitft.tools.audit import (
        AttackSettings,
        AuditReport,
        DefenseCase,
        audit_inversion,
        audit_labels,
        device_examples,
        finetune_split,
        parse_cuts,
        write_report,
    )

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
        settings = AttackSettings(public_tokens=public_tokens, eval_tokens=eval_tokens, steps=steps, seed=seed)
        median = clip is not None and clip.strip() == "median"
        try:
            clip_value = None if clip is None or median else float(clip)
        except ValueError as exc:
            raise ConfigError(f"--clip must be a number or 'median', got {clip!r}") from exc
        defense = DefenseSettings(noise=noise, clip=clip_value, nopeek=nopeek)
        if finetune_steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {finetune_steps}")
        if nopeek > 0 and finetune_steps == 0:
            raise ConfigError("--nopeek is a training-time defense: give --finetune-steps N to train with it")
        if median and finetune_steps > 0:
            raise ConfigError("--clip median is calibrated by the attack only; give a number with --finetune-steps")
        adapters = None
        if adapter is not None:
            weights = adapter / "adapter_model.safetensors"
            if not weights.is_file():
                raise ModelError(f"--adapter {adapter}: no adapter_model.safetensors there")
            adapters = load_file(weights)  # safetensors: tensors only, nothing executed
        base = DefenseCase("none", adapters=adapters)
        cases = [base]
        defended = defense.active or nopeek > 0
        if defended and finetune_steps == 0:
            cases.append(
                DefenseCase(
                    defense.describe() if not median else f"clip median, noise {noise:g}",
                    defense,
                    0.5 if median else None,
                    adapters,
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
                case = DefenseCase(f"{defense.describe()}, fine-tuned", defense, adapters=lora_state(client.peft_model))
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
    table = Table(
        title=f"Token recovery from the activations at the cut (held-out GSM8K, {report.inversion[0].eval_tokens} tokens)"
    )
    for column in ("cut", "baseline", *names):
        table.add_column(column, justify="right")
    by = {(r.defense, r.cut): r.recovery for r in report.inversion}
    for c in cut_list:
        baseline = next(r.baseline for r in report.inversion if r.cut == c)
        table.add_row(str(c), f"{baseline:.1%}", *(f"{by[(n, c)]:.1%}" if (n, c) in by else "-" for n in names))
    console.print(table)
    if labels:
        leak = Table(title="U-split label leakage: labels recovered by the server")
        for column in ("device tail k", "server sees block", "from hidden + gradient", "own guess", "baseline"):
            leak.add_column(column, justify="right")
        for r in labels:
            leak.add_row(str(r.tail), str(r.depth), f"{r.recovery:.1%}", f"{r.hidden_only:.1%}", f"{r.baseline:.1%}")
        console.print(leak)
    console.print(f"table {out / 'audit.md'}, numbers {out / 'audit.json'}, plot {out / 'audit.png'}")


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more: every message refused, and why.")] = False,
) -> None:
    """SplitFT coordinator: runs the server segment of a split model and coordinates the edge agents."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)


app.command("import")(import_model)
app.command("generate")(generate_command)
app.command("evaluate")(evaluate_command)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
