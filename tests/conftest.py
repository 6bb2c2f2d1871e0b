"""Shared test helpers: real tiny models built from configs, saved to real folders."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


def save_model(config: PretrainedConfig, folder: Path, seed: int = 7) -> Path:
    """Build a model from ``config`` with a fixed seed and save it as a normal Hugging Face folder."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- a real Mosquitto broker


def _mosquitto_binary() -> str:
    import shutil

    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        # Never skip: the broker tests are the point. CI installs it (see .ci/run).
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (scripts/test.sh does it in CI)")
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def start_mosquitto(folder: Path, extra_config: str = "") -> Broker:
    """Start Mosquitto on a free 127.0.0.1 port with its own config; wait until it accepts connections."""
    import socket
    import time

    port = _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf, log = folder / "mosquitto.conf", folder / "mosquitto.log"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n{extra_config}"
    )
    process = subprocess.Popen(
        [_mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
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
    broker.process.terminate()  # only the process this fixture started, by its pid
    try:
        broker.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        broker.process.kill()
        broker.process.wait()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_mosquitto(tmp_path / "broker")
    yield b
    stop_broker(b)
