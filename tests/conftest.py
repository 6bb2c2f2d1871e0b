"""Shared test helpers: real tiny models built from configs, saved to real folders."""

from __future__ import annotations

from collections.abc import Iterator
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

# The broker helpers (splitft.coordinator.brokers) are shared with the benchmarks and scripts/local_broker.py.
from splitft.coordinator.brokers import Broker, start_mosquitto, stop_broker  # noqa: E402

__all__ = ["Broker", "save_model", "start_mosquitto", "stop_broker"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of this test's own on a free 127.0.0.1 port. A missing mosquitto fails the test."""
    b = start_mosquitto(tmp_path / "broker")
    yield b
    stop_broker(b)
