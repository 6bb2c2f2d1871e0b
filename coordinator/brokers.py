"""Start a Mosquitto broker on 127.0.0.1 with its own config, for tests, benchmarks and trying things.

    python scripts/local_broker.py [--port 1883]     # runs until Ctrl-C

    python scripts/local_broker.py --secrets fleet  # TLS + passwords + ACL (scripts/fleet_secrets.py)

From Python: ``broker = start_mosquitto(folder)`` ... ``stop_broker(broker)``; with the secrets of
``scripts/fleet_secrets.py``, ``start_secure_mosquitto(folder, secrets)`` (``broker.url`` is mqtts://).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import typer

from splitft.shared.cli_options import run_app


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    scheme: str = "mqtt"  # "mqtts" for start_secure_mosquitto's TLS listener

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (scripts/test.sh does it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(folder: Path, port: int | None = None, extra_config: str = "") -> Broker:
    """Start Mosquitto on 127.0.0.1 (a free port unless given); return once it accepts connections."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf, log = folder / "mosquitto.conf", folder / "mosquitto.log"
    # Started as root, Mosquitto drops to its own user, which cannot write the log into a private folder.
    user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}"
        f"log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n{extra_config}"
    )
    process = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Broker("127.0.0.1", port, process, log)
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("mosquitto did not start listening within 10 s")


class BrokerSecrets(Protocol):
    """The broker's files among a fleet's secrets (scripts/fleet_secrets.py's FleetSecrets)."""

    @property
    def ca_cert(self) -> Path: ...
    @property
    def broker_cert(self) -> Path: ...
    @property
    def broker_key(self) -> Path: ...
    @property
    def password_file(self) -> Path: ...
    @property
    def acl_file(self) -> Path: ...


def start_secure_mosquitto(
    folder: Path, secrets: BrokerSecrets, port: int | None = None, extra_config: str = ""
) -> Broker:
    """Start Mosquitto with only a TLS listener on 127.0.0.1, the fleet's password file and ACL, and no
    anonymous clients; return once the port accepts TCP connections. ``broker.url`` is mqtts://127.0.0.1:PORT
    (the broker certificate must name 127.0.0.1: fleet_secrets.py's default hosts do)."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf, log = folder / "mosquitto.conf", folder / "mosquitto.log"
    for path in (secrets.ca_cert, secrets.broker_cert, secrets.broker_key, secrets.password_file, secrets.acl_file):
        if not Path(path).is_file():
            raise RuntimeError(f"broker secret {path} does not exist (make it with scripts/fleet_secrets.py)")
    conf.write_text(
        # Started as root, Mosquitto would drop to the "mosquitto" user, which cannot read the 0600 secrets
        # (nor write the log): stay the user who started it (the option does nothing for other users).
        f"user {getpass.getuser()}\n"
        f"per_listener_settings false\nallow_anonymous false\n"
        f"password_file {secrets.password_file}\nacl_file {secrets.acl_file}\n"
        f"listener {port} 127.0.0.1\nprotocol mqtt\n"
        f"cafile {secrets.ca_cert}\ncertfile {secrets.broker_cert}\nkeyfile {secrets.broker_key}\n"
        f"tls_version tlsv1.2\nrequire_certificate false\npersistence false\n"
        f"log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        f"connection_messages true\n{extra_config}"
    )
    process = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stderr.read().decode() if process.stderr else ""
            logged = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"mosquitto exited: {output}{logged}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Broker("127.0.0.1", port, process, log, scheme="mqtts")
        except OSError:
            time.sleep(0.05)
    process.terminate()
    process.wait()
    raise RuntimeError("mosquitto did not start listening within 10 s")


def stop_broker(broker: Broker) -> None:
    """Stop the broker this module started (by its pid)."""
    broker.process.terminate()
    try:
        broker.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        broker.process.kill()
        broker.process.wait()


app = typer.Typer(add_completion=False)


@app.command(help=__doc__)
def serve(
    port: Annotated[int | None, typer.Option("--port", help="default: 1883, or a free port with --secrets")] = None,
    folder: Annotated[Path, typer.Option("--folder")] = Path("runs/broker"),
    secrets: Annotated[
        Path | None,
        typer.Option(
            "--secrets", help="folder of scripts/fleet_secrets.py: TLS, passwords and ACL (port: free if not given)"
        ),
    ] = None,
) -> None:
    if secrets is not None:
        from splitft.tools.fleet_secrets import load_fleet_secrets

        broker = start_secure_mosquitto(folder, load_fleet_secrets(secrets), port)
    else:
        broker = start_mosquitto(folder, port or 1883)
    print(f"Mosquitto listening at {broker.url} (log: {broker.log}); Ctrl-C stops it")
    try:
        broker.process.wait()
    except KeyboardInterrupt:
        stop_broker(broker)


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/local_broker.py``: start a broker and wait until Ctrl-C; returns the exit code."""
    return run_app(app, argv)
