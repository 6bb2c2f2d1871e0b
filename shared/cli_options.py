"""What the command lines share: the broker options that `splitft-agent join` and `splitft-coordinator run` and
`worker` declare alike (typer ``Annotated`` aliases; each command gives the defaults), :func:`broker_from_options`
that turns them into :class:`~splitft.shared.wire.broker.BrokerSettings`, and :func:`run_app`, how the typer apps of
the tools and benchmarks run as ``main(argv) -> int``."""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from splitft.shared.wire.broker import BrokerSettings

BrokerOpt = Annotated[
    str, typer.Option(envvar="SPLITFT_BROKER", help="Broker URL: mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS.")
]
UsernameOpt = Annotated[str | None, typer.Option(envvar="SPLITFT_USERNAME", help="Broker user name.")]
PasswordOpt = Annotated[str | None, typer.Option(envvar="SPLITFT_PASSWORD", help="Broker password.")]
CaFileOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="SPLITFT_CA_FILE",
        help="TLS: the CA certificate that signed the broker's certificate (PEM); default: the system's CAs. "
        "Needs an mqtts:// broker URL.",
    ),
]
CertFileOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="SPLITFT_CERT_FILE",
        help="TLS: this member's client certificate (PEM), for brokers that ask for one; needs --key-file.",
    ),
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(envvar="SPLITFT_KEY_FILE", help="TLS: the private key of --cert-file (PEM)."),
]
AuthKeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="SPLITFT_AUTH_KEY_FILE",
        help="The job key file (made by `splitft-coordinator make-key`): every message is signed with it and "
        "messages not signed with it are refused. The coordinator and every agent need the same file.",
    ),
]
AuthWindowOpt = Annotated[
    float,
    typer.Option(
        help="With --auth-key-file: refuse messages stamped more than this many seconds away from this machine's "
        "clock, so that recorded messages cannot be replayed later. Keep the members' clocks in sync (NTP)."
    ),
]
MqttProtocolOpt = Annotated[str, typer.Option(help="MQTT version: 5, or 3.1.1 for brokers without v5.")]
ConnectTimeoutOpt = Annotated[float, typer.Option(help="Seconds to reach the broker at start-up.")]


def broker_from_options(
    broker: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    auth_key_file: Path | None,
    auth_window: float,
    mqtt_protocol: str,
    connect_timeout: float,
    client_id: str | None = None,
) -> BrokerSettings:
    """The broker settings of the options above, by their parameter names; a ConfigError names the bad option."""
    from splitft.shared.wire.broker import broker_settings

    return broker_settings(
        broker, username=username, password=password, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        auth_key_file=auth_key_file, auth_window_s=auth_window, client_id=client_id, protocol=mqtt_protocol,
        connect_timeout_s=connect_timeout,
    )  # fmt: skip


#: what `run` and `join` say once when the job has no key
UNAUTHENTICATED = (
    "warning: no --auth-key-file: this job's messages are not authenticated, so any client of the broker can "
    "publish messages in its members' names (forged uploads, gradients, assignments). Give the coordinator and "
    "every device the same job key (splitft-coordinator make-key); see OPERATIONS.md, "
    '"The job key and message authentication".'
)


def warn_unauthenticated(auth_key_file: Path | None) -> None:
    """Say once, on stderr, what a job without a key exposes (the commands call it as they start)."""
    if auth_key_file is None:
        typer.secho(UNAUTHENTICATED, err=True, fg=typer.colors.YELLOW)


# --------------------------------------------------------------------------- typer apps as main(argv) -> int

#: what typer raises on a bad command line: click's ClickException (typer 0.2x carries its own copy of click)
_CLICK_ERROR = cast(type[Exception], next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def run_app(app: typer.Typer, argv: Sequence[str] | None = None, *, lists: Collection[str] = ()) -> int:
    """Run a one-command typer app on ``argv`` (default: the process's arguments) and return its exit code: the
    command's own (an int it returns, or a typer.Exit), 0 after ``--help``, 2 for a bad command line (the
    error printed as click prints it), 130 on Ctrl-C.

    ``lists``: options that take one or more values, as argparse's ``nargs="+"`` did (``--alphas 0.1 1.0``);
    typer takes them once per value (``multiple``), and :func:`spread_lists` rewrites the command line so."""
    args = list(sys.argv[1:] if argv is None else argv)
    if lists:
        args = spread_lists(args, lists)
    try:
        result = typer.main.get_command(app).main(args=args, standalone_mode=False)
    except _CLICK_ERROR as exc:
        error = cast(Any, exc)
        error.show()
        return int(error.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        return 1
    return result if isinstance(result, int) else 0


def check_choices(option: str, values: str | Sequence[str] | None, allowed: Sequence[str]) -> None:
    """argparse's ``choices``: each value must be one of ``allowed``, else a usage error (exit 2) that names the
    option and what it takes. None (not given) passes."""
    for value in [values] if isinstance(values, str) else values or ():
        if value not in allowed:
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(map(repr, allowed))}", param_hint=f"'{option}'"
            )


def spread_lists(args: Sequence[str], lists: Collection[str]) -> list[str]:
    """``--opt a b --other`` -> ``--opt a --opt b --other`` for each option in ``lists``: its values are the
    arguments after it up to the next one that starts with ``--`` (or ``-`` and a letter). As with argparse, the
    last use of an option wins: ``--opt a --opt b`` -> ``--opt b``."""
    groups: list[tuple[str | None, Sequence[str]]] = []  # (an option of ``lists``, its values) or (None, arguments)
    i = 0
    while i < len(args):
        if args[i] == "--":
            groups.append((None, args[i:]))
            break
        if args[i] not in lists:
            groups.append((None, args[i : i + 1]))
            i += 1
            continue
        end = i + 1
        while end < len(args) and not _is_option(args[end]):
            end += 1
        groups.append((args[i], args[i + 1 : end]))
        i = end
    last = {option: n for n, (option, _) in enumerate(groups) if option is not None}
    out: list[str] = []
    for n, (option, values) in enumerate(groups):
        if option is None:
            out += values
        elif last[option] == n:  # with no value, the option alone: the parser says what is missing
            out += [part for value in values for part in (option, value)] if values else [option]
    return out


def _is_option(arg: str) -> bool:
    return arg.startswith("--") or (len(arg) > 1 and arg[0] == "-" and arg[1].isalpha())
