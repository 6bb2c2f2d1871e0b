"""Shared test helpers: real tiny models built from configs, saved to real folders."""

from __future__ import annotations

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
