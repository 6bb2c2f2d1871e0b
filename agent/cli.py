"""`splitft-agent`: the command run on each edge device."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from pathlib import Path
from typing import Annotated

import typer

from splitft.shared.errors import ConfigError, DataError, LinkError, ModelError
from splitft.shared.exit_codes import ExitCode, exit_code_for
from splitft.shared.models import PRESETS, resolve_device

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
    broker: Annotated[str, typer.Option(envvar="SPLITFT_BROKER", help="Broker URL, mqtt://HOST:PORT.")],
    job: Annotated[str, typer.Option(envvar="SPLITFT_JOB", help="Job name (the coordinator's).")],
    data: Annotated[Path, typer.Option(help="This device's training data: JSONL or CSV of prompt/response pairs.")],
    model: Annotated[str, typer.Option(help=f"Preset ({', '.join(PRESETS)}) or local model folder.")],
    agent_id: Annotated[
        str | None, typer.Option("--id", envvar="SPLITFT_AGENT_ID", help="This agent's name (default: hostname).")
    ] = None,
    username: Annotated[str | None, typer.Option(envvar="SPLITFT_USERNAME", help="Broker user name.")] = None,
    password: Annotated[str | None, typer.Option(envvar="SPLITFT_PASSWORD", help="Broker password.")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (default: the agent id + a suffix).")] = None,
    mqtt_protocol: Annotated[str, typer.Option(help="MQTT version: 5, or 3.1.1 for brokers without v5.")] = "5",
    profile: Annotated[
        str | None, typer.Option(help="Device class this agent reports (e.g. jetson-orin-nano).")
    ] = None,
    emulate: Annotated[
        str | None, typer.Option(help="Behave like this device profile (firmware_profiles/NAME.toml, or a file).")
    ] = None,
    emulate_scale: Annotated[float, typer.Option(help="Multiply the emulated device's compute throughput.")] = 1.0,
    prompt_field: Annotated[str | None, typer.Option(help="Prompt field (default: detected).")] = None,
    response_field: Annotated[str | None, typer.Option(help="Response field (default: detected).")] = None,
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many samples.")] = None,
    device: Annotated[str, typer.Option(help="Torch device for the client segment: auto, cpu, cuda.")] = "auto",
    connect_timeout: Annotated[float, typer.Option(help="Seconds to reach the broker at start-up.")] = 30.0,
) -> None:
    """Join a job: train the client segment when assigned, until the coordinator says the job is done."""
    from splitft.agent.runtime import Agent, AgentSettings
    from splitft.shared.link import BrokerSettings
    from splitft.shared.topics import check_name

    try:
        name = check_name("agent", agent_id or _default_id())
        settings = AgentSettings(
            name=name,
            job=check_name("job", job),
            model=model,
            data=data,
            prompt_field=prompt_field,
            response_field=response_field,
            max_samples=max_samples,
            device=resolve_device(device),
            profile=profile,
            emulate=emulate,
            emulate_scale=emulate_scale,
        )
        link = BrokerSettings(
            url=broker,
            username=username,
            password=password,
            client_id=client_id,
            protocol=mqtt_protocol,
            connect_timeout_s=connect_timeout,
        )
        agent = Agent(settings, link)
        typer.echo(f"agent {name}: {len(agent.pairs)} samples from {data}; joining job {job} at {broker}")
        asyncio.run(agent.run())
    except (ConfigError, DataError, ModelError, LinkError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(int(exit_code_for(exc))) from exc
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    typer.echo(f"agent {name}: the job is done ({agent.rounds_done} rounds trained)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
