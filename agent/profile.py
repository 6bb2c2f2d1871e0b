"""What an agent tells the coordinator about its device when it joins."""

from __future__ import annotations

import os
from typing import Any

import psutil
import torch


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
