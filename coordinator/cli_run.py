"""The coordinator's job commands: ``run`` a job (rank 0), a ``worker`` of its server segment on another process
or host, and ``make-key``, the job key that signs their messages and the agents'."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from splitft.coordinator.cli_jobs import (
    ConfigOpt,
    DashboardTokenOpt,
    DeviceOpt,
    OutOpt,
    TensorBoardOpt,
    build_observatory,
    observed,
    preflight,
)
from splitft.coordinator.cli_support import fail, new_console, new_folders, remove_empty
from splitft.shared.cli_options import (
    AuthKeyFileOpt,
    AuthWindowOpt,
    BrokerOpt,
    CaFileOpt,
    CertFileOpt,
    ConnectTimeoutOpt,
    KeyFileOpt,
    MqttProtocolOpt,
    PasswordOpt,
    UsernameOpt,
    broker_from_options,
    warn_unauthenticated,
)
from splitft.shared.errors import ConfigError, ExitCode, SplitFTError
from splitft.shared.job.config import JobConfig, torch_device
from splitft.shared.wire.keys import write_key
from splitft.tools.audit.table import job_privacy

WorkerTimeoutOpt = Annotated[
    float,
    typer.Option(
        help="Seconds a worker collective may wait for the others (rank 0 admitting and evaluating included)."
    ),
]


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
        write_key(out, replace=force)
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


def _job(config: Path | None, **overrides: Any) -> JobConfig:
    base = JobConfig.from_toml(config) if config is not None else JobConfig()
    return base.with_overrides(**overrides)


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
        settings = broker_from_options(
            broker, username=username, password=password, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            auth_key_file=auth_key_file, auth_window=auth_window, mqtt_protocol=mqtt_protocol,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        server_device = torch_device(device)
        preflight(spec, out)
        warn_unauthenticated(auth_key_file)
        observatory = build_observatory(spec, console, dashboard, dashboard_token, tensorboard, default=False)
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
    console.print(job_privacy(spec), highlight=False)
    made = new_folders(out)  # removed again if the run fails before writing anything in them
    try:
        coordinator = Coordinator(
            spec, settings, out, resume=resume, device=server_device, progress=observatory, workers=group,
            worker_processes=processes,
        )  # fmt: skip
        summary = asyncio.run(observed(observatory, console, coordinator.run))
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
        settings = broker_from_options(
            broker, username=username, password=password, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            auth_key_file=auth_key_file, auth_window=auth_window, mqtt_protocol=mqtt_protocol,
            connect_timeout=connect_timeout,
        )  # fmt: skip
        group = WorkerGroup(rank, workers, rendezvous, timeout_s=worker_timeout)
        asyncio.run(run_worker(group, settings, torch_device(device)))
    except SplitFTError as exc:
        raise fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
