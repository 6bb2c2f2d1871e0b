#!/usr/bin/env python3
"""Start a Mosquitto broker on 127.0.0.1 with its own config, for tests, benchmarks and trying things.

    python scripts/local_broker.py [--port 1883]     # runs until Ctrl-C

From Python: ``broker = start_mosquitto(folder)`` ... ``stop_broker(broker)``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


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
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
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


def stop_broker(broker: Broker) -> None:
    """Stop the broker this module started (by its pid)."""
    broker.process.terminate()
    try:
        broker.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        broker.process.kill()
        broker.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--folder", type=Path, default=Path("runs/broker"))
    args = parser.parse_args()
    broker = start_mosquitto(args.folder, args.port)
    print(f"Mosquitto listening at {broker.url} (log: {broker.log}); Ctrl-C stops it")
    try:
        broker.process.wait()
    except KeyboardInterrupt:
        stop_broker(broker)


if __name__ == "__main__":
    main()
