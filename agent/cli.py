"""`splitft-agent`: the command run on each edge device."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
from pathlib import Path
from typing import Annotated

import typer

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
from splitft.shared.errors import ConfigError, DataError, ExitCode, LinkError, ModelError, exit_code_for
from splitft.shared.model.loading import PRESETS
from splitft.shared.profiles import DeviceProfile, load_profile
from splitft.shared.wire.sealed import load_fleet_key, make_fleet_key

app = typer.Typer(
    help="SplitFT edge agent: runs the client segment of a split model on this device's own data.",
    no_args_is_help=True,
    add_completion=False,
)
log = logging.getLogger("splitft.agent")


def _default_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "agent"


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    """SplitFT edge agent."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def join(
    broker: BrokerOpt,
    job: Annotated[str, typer.Option(envvar="SPLITFT_JOB", help="Job name (the coordinator's).")],
    data: Annotated[Path, typer.Option(help="This device's training data: JSONL or CSV of prompt/response pairs.")],
    model: Annotated[
        str, typer.Option(help=f"Preset ({', '.join(PRESETS)}), Hugging Face model folder or .gguf file.")
    ],
    agent_id: Annotated[
        str | None, typer.Option("--id", envvar="SPLITFT_AGENT_ID", help="This agent's name (default: hostname).")
    ] = None,
    username: UsernameOpt = None,
    password: PasswordOpt = None,
    ca_file: CaFileOpt = None,
    cert_file: CertFileOpt = None,
    key_file: KeyFileOpt = None,
    auth_key_file: AuthKeyFileOpt = None,
    auth_window: AuthWindowOpt = 300.0,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (default: the agent id + a suffix).")] = None,
    mqtt_protocol: MqttProtocolOpt = "5",
    profile: Annotated[
        str | None,
        typer.Option(
            help="Device class this agent reports to the coordinator: a name from firmware_profiles/ "
            "(e.g. jetson-orin-nano) or a profile .toml file of your own."
        ),
    ] = None,
    emulate: Annotated[
        str | None, typer.Option(help="Behave like this device profile (firmware_profiles/NAME.toml, or a file).")
    ] = None,
    emulate_scale: Annotated[float, typer.Option(help="Multiply the emulated device's compute throughput.")] = 1.0,
    emulate_virtual: Annotated[
        bool,
        typer.Option(help="Report the emulated device's times without waiting for them (simulated-time studies)."),
    ] = False,
    prompt_field: Annotated[str | None, typer.Option(help="Prompt field (default: detected).")] = None,
    response_field: Annotated[str | None, typer.Option(help="Response field (default: detected).")] = None,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many samples.")] = None,
    device: Annotated[str, typer.Option(help="Torch device for the client segment: auto, cpu, cuda.")] = "auto",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Dtype of the frozen base weights on this device: fp32, bf16 or fp16 (the adapters stay fp32). "
            "Default: the --emulate or --profile class's (fp16 on Jetsons), else fp32."
        ),
    ] = None,
    connect_timeout: ConnectTimeoutOpt = 30.0,
    fleet_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="SPLITFT_FLEET_KEY_FILE",
            help="The fleet key (make-fleet-key): needed by a job with private adapters, whose client blocks' "
            "adapters travel sealed with it and are averaged by the devices; the coordinator must not have it.",
        ),
    ] = None,
) -> None:
    """Join a job: train the client segment when assigned, until the coordinator says the job is done.

    Everything given is checked before the agent connects: a bad option, profile, data file or model
    ends the command with an error naming it (and its exit code), without touching the broker."""
    from splitft.agent.runtime import Agent, AgentSettings
    from splitft.shared.job.config import torch_device
    from splitft.shared.model.precision import torch_dtype
    from splitft.shared.wire.topics import check_name

    try:
        name = check_name("agent", agent_id or _default_id())
        link = broker_from_options(
            broker, username=username, password=password, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            auth_key_file=auth_key_file, auth_window=auth_window, mqtt_protocol=mqtt_protocol,
            connect_timeout=connect_timeout, client_id=client_id,
        )  # fmt: skip
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"--max-samples must be at least 1, got {max_samples}")
        if not (math.isfinite(emulate_scale) and emulate_scale > 0):
            raise ConfigError(f"--emulate-scale must be a positive number, got {emulate_scale}")
        emulated = _profile("--emulate", emulate) if emulate else None  # fail now, not after the model is loaded
        declared = None if profile is None else _profile("--profile", profile)
        if dtype is not None:
            torch_dtype(dtype, "--dtype")
        if data.is_dir():
            raise DataError(f"{data}: is a folder; --data takes a JSONL or CSV file")
        settings = AgentSettings(
            name=name,
            job=check_name("job", job),
            model=model,
            data=data,
            prompt_field=prompt_field,
            response_field=response_field,
            max_samples=max_samples,
            device=torch_device(device),
            profile=None if declared is None else declared.name,
            emulate=emulate,
            emulate_scale=emulate_scale,
            emulate_virtual=emulate_virtual,
            # --dtype, else the emulated class's (the agent's own default), else the declared class's
            dtype=dtype or (declared.dtype if declared is not None and emulated is None else None),
            fleet_key=None if fleet_key_file is None else load_fleet_key(fleet_key_file),
        )
        agent = Agent(settings, link)
        typer.echo(f"agent {name}: {len(agent.records)} samples from {data}; joining job {job} at {broker}")
        warn_unauthenticated(auth_key_file)
        asyncio.run(agent.run())
    except (ConfigError, DataError, ModelError, LinkError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(exit_code_for(exc))) from exc
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    typer.echo(f"agent {name}: the job is done ({agent.rounds_done} rounds trained)")


@app.command("make-fleet-key")
def make_fleet_key_command(
    out: Annotated[Path, typer.Option(help="Where to write the key (never overwritten; mode 0600).")],
) -> None:
    """Make a fleet key: 32 random bytes the devices of a job with private adapters share (join --fleet-key-file)
    and its coordinator must never hold. Copy it to every device by a channel of your own, not through the broker."""
    try:
        typer.echo(f"fleet key written to {make_fleet_key(out)}; give it to the devices only")
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(exit_code_for(exc))) from exc
    except OSError as exc:
        typer.echo(f"error: cannot write {out}: {exc}", err=True)
        raise typer.Exit(int(ExitCode.CONFIG)) from exc


def _profile(option: str, name_or_path: str) -> DeviceProfile:
    """A shipped profile by name, or a profile file; the error names the option."""
    try:
        return load_profile(name_or_path)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from exc


def main() -> None:
    app()


if __name__ == "__main__":
    main()
