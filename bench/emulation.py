"""One emulated client step timed on the wall clock against its device profile's prediction: what
scripts/bench_emulation.py measures and tests/test_emulation.py checks (never shorter than predicted)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from splitft.agent.emulation import Emulation
from splitft.agent.step import backward, forward
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.loading import block_flops, load_config
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.profiles import DeviceProfile, load_profile
from splitft.shared.wire.codec import pack

SLOW_BOARD = """
name = "slow-board"
description = "a made-up device, slower than any test host"

[compute]
peak_gflops = 0.02    # assumed, for the benchmark: far slower than any host, even a busy one
efficiency = 0.5      # assumed
dtype = "fp32"

[memory]
total_mb = 1024
usable_mb = 512

[link]
uplink_mbps = 20.0    # assumed
downlink_mbps = 40.0  # assumed
rtt_ms = 30.0         # assumed
"""


def slow_board() -> DeviceProfile:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "slow-board.toml"
        path.write_text(SLOW_BOARD)
        return load_profile(path)


def timed_step(profile: DeviceProfile, length: int = 32) -> tuple[float, float, float, float]:
    """One emulated client step of tiny-gpt2 at cut 1 on ``profile``: (wall seconds, predicted seconds,
    reported forward seconds, reported backward seconds)."""
    emulation = Emulation(profile)
    config = load_config("tiny-gpt2")
    segment = build_segment("tiny-gpt2", SegmentSpec.client(1))
    optimizer = torch.optim.SGD(segment.lora_parameters().values(), lr=0.1)
    ids = torch.randint(0, 50257, (1, length))
    lengths = torch.tensor([length])
    flops = block_flops(config, 1, length)
    segment(ids, torch.ones_like(ids)).sum().backward()  # warm-up, not timed
    optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    hidden, _, body, forward_s = forward(
        segment, ids, ids, lengths, "fp16", {}, emulation, flops, DefenseSettings(), torch.Generator()
    )
    up = len(pack(body))
    time.sleep(emulation.uplink_s(up))
    grad = torch.randn_like(hidden) * 1e-3
    down = len(pack({"grad": grad.half().numpy().tobytes()}))
    time.sleep(emulation.downlink_s(down))
    backward_s = backward(hidden, grad, optimizer, emulation, flops)
    elapsed = time.perf_counter() - started
    predicted = profile.compute_seconds(2 * flops) + profile.transfer_seconds(up, down)
    return elapsed, predicted, forward_s, backward_s
