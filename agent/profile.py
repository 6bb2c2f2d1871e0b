"""What an agent tells the coordinator about its device when it joins."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open

from splitft.shared.model.loading import block_flops, is_preset, load_config, num_layers, resolve_source, weight_files
from splitft.shared.model.loss import head_rows
from splitft.shared.model.memory import MemoryFigures
from splitft.shared.model.split import SegmentSpec, build_segment


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


def peak_rss_mb() -> float:
    """The most resident memory this process has held (0 where the platform does not say).

    Linux: ``VmHWM``, the high-water mark of this program's memory. Not ``ru_maxrss``, which a process
    started by another keeps from its parent across exec (an agent that ``local`` starts would report the
    coordinator's peak)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    try:
        import resource  # POSIX only
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def usable_mb() -> float:
    """The memory this agent can use: what the system has available now, and what the process already holds."""
    return (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / 2**20


def runtime_mb() -> float:
    """This process's resident memory: the runtime before a segment (see memory.SHARED_PROCESS_RUNTIME_MB)."""
    return psutil.Process().memory_info().rss / 2**20


def measure_memory(
    model: str,
    batch: int,
    length: int,
    *,
    usable: float,
    runtime: float,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> MemoryFigures:
    """This device's memory figures for a job of ``batch`` x ``length`` token steps, in base ``dtype``.

    Builds a probe with the embeddings, block 0, the final norm and the head, and runs block 0 forward on a
    batch of that shape with its input requiring a gradient (as every block but the first does in training),
    counting the bytes of the tensors autograd keeps for the backward pass. Weights are counted from the
    tensors as built; the chunked head's working memory from its chunk size (shared/model/loss.py).
    """
    layers = num_layers(load_config(model))
    segment = build_segment(model, SegmentSpec.u_device(1, 0, layers), device=device, dtype=dtype)
    model_, family = segment.hf_model, segment.family
    embed_ptrs: set[int] = set()

    def weights(modules: list[str]) -> float:
        total = 0
        for path in modules:
            for p in model_.get_submodule(path).parameters():
                ptr = p.untyped_storage().data_ptr()
                if ptr in embed_ptrs:
                    continue  # a tied head: the embeddings hold it
                if path in family.embeddings:
                    embed_ptrs.add(ptr)
                # LoRA: the weights, their gradients and AdamW's two moments; frozen weights: once
                total += p.numel() * p.element_size() * (4 if p.requires_grad else 1)
        return total / 2**20

    embed = weights(list(family.embeddings))
    block = weights([f"{family.layers}.0"])
    head_weights = weights([family.final_norm, family.lm_head])
    hidden_size, vocab = int(segment.config.hidden_size), int(segment.config.vocab_size)
    tokens = batch * length
    element = dtype.itemsize
    # The chunked head: a chunk's fp32 logits, worked on in place (a half-precision base adds the chunk in its
    # own dtype, first as the product and then for the gradient); the targets' hidden states, normed, and
    # their gradient.
    rows = min(tokens, head_rows(vocab))
    chunk = rows * vocab * (4 + (element if element < 4 else 0))
    head = head_weights + (chunk + tokens * hidden_size * (2 * element + 4)) / 2**20
    io = 4 * tokens * hidden_size * (4 + 2) / 2**20  # activations and gradients, each way: fp32 and wire bytes
    load = largest_stored_mb(model)

    ids = torch.randint(0, vocab, (batch, length), device=segment.device)
    mask = torch.ones_like(ids)
    params = {p.untyped_storage().data_ptr() for p in segment.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    segment.train()
    with torch.no_grad():
        start = family.embed(model_, ids, torch.arange(length, device=ids.device).unsqueeze(0))
    start = start.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = segment(start, mask, start=0, stop=1, with_head=False)
    act = (sum(kept.values()) + out.numel() * out.element_size()) / 2**20
    del out, segment
    return MemoryFigures(usable, runtime, embed, block, act, head, io, load)


#: Bytes per element of the safetensors dtypes a checkpoint's weights come in.
_STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def largest_stored_mb(model: str) -> float:
    """The largest tensor of ``model`` as stored (a preset's are drawn in fp32): the load's transient."""
    config = load_config(model)
    if is_preset(model):
        return int(config.vocab_size) * int(config.hidden_size) * 4 / 2**20
    largest = 0
    for file in weight_files(Path(resolve_source(model))):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (not a dict)
                part = f.get_slice(key)
                largest = max(largest, math.prod(part.get_shape()) * _STORED_BYTES.get(part.get_dtype(), 4))
    return largest / 2**20


def measure_block(
    model: str, batch: int = 4, length: int = 128, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Time one block's forward and backward at a (batch, length) step: (seconds, forward FLOPs).

    Builds a one-block client segment (the embeddings and block 0 only), runs two warm-up passes and
    takes the best of three timed ones.
    """
    segment = build_segment(model, SegmentSpec.client(1), device=device, dtype=dtype)
    ids = torch.randint(0, int(segment.config.vocab_size), (batch, length))
    mask = torch.ones_like(ids)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        hidden = segment(ids.to(segment.device), mask.to(segment.device))
        hidden.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return min(times[2:]), block_flops(load_config(model), batch, length)
