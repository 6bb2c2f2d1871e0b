"""What an agent tells the coordinator about its device when it joins."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil
import torch

from splitft.shared.models import block_flops, load_config
from splitft.shared.split import SegmentSpec, build_segment


def device_profile() -> dict[str, Any]:
    """Cores, clock, memory and load from psutil, and the accelerator torch sees (if any)."""
    freq = psutil.cpu_freq()
    memory = psutil.virtual_memory()
    profile: dict[str, Any] = {
        "cpu_logical": psutil.cpu_count(logical=True) or 1,
        "cpu_physical": psutil.cpu_count(logical=False) or 1,
        "cpu_max_mhz": float(freq.max or freq.current) if freq else 0.0,
        "memory_total_mb": memory.total // 2**20,
        "memory_available_mb": memory.available // 2**20,
        "load_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        "torch_threads": torch.get_num_threads(),
        "accelerator": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        profile.update(accelerator=props.name, accelerator_memory_mb=props.total_memory // 2**20)
    return profile


def measure_block(model: str, batch: int = 4, length: int = 128, device: str = "cpu") -> tuple[float, float]:
    """Time one block's forward and backward at a (batch, length) step: (seconds, forward FLOPs).

    Builds a one-block client segment (the embeddings and block 0 only), runs two warm-up passes and
    takes the best of three timed ones.
    """
    segment = build_segment(model, SegmentSpec.client(1), device=device)
    ids = torch.randint(0, int(segment.config.vocab_size), (batch, length))
    mask = torch.ones_like(ids)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        hidden = segment(ids.to(segment.device), mask.to(segment.device))
        hidden.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return min(times[2:]), block_flops(load_config(model), batch, length)
