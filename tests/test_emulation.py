"""Emulating a device class: a step takes what the profile predicts, within 15%."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from splitft.agent.emulation import Emulation
from splitft.agent.runtime import _backward, _forward
from splitft.shared.codec import pack
from splitft.shared.defense import DefenseSettings
from splitft.shared.models import block_flops, block_params, load_config
from splitft.shared.profiles import load_profile
from splitft.shared.split import SegmentSpec, build_segment

SLOW_BOARD = """
name = "slow-board"
description = "a made-up device, slower than any test host"

[compute]
peak_gflops = 0.2     # assumed, for the test: far slower than any host, even a busy one
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


def test_block_params_match_the_model() -> None:
    for preset in ("tiny-gpt2", "tiny-llama"):
        segment = build_segment(preset, SegmentSpec.client(1))
        counted = sum(
            p.numel()
            for n, p in segment.peft_model.named_parameters()
            if ".0." in n and "lora" not in n and p.dim() == 2
        )
        assert block_params(load_config(preset)) == counted, preset


def test_emulated_step_matches_the_profile_prediction(tmp_path: Path) -> None:
    path = tmp_path / "slow-board.toml"
    path.write_text(SLOW_BOARD)
    profile = load_profile(path)
    emulation = Emulation(profile)
    config = load_config("tiny-gpt2")
    segment = build_segment("tiny-gpt2", SegmentSpec.client(1))
    optimizer = torch.optim.SGD(segment.lora_parameters().values(), lr=0.1)
    ids = torch.randint(0, 50257, (1, 32))
    lengths = torch.tensor([32])
    flops = block_flops(config, 1, 32)  # 13 MFLOP: 0.13 s per phase on this board
    segment(ids, torch.ones_like(ids)).sum().backward()  # warm-up, not timed

    started = time.perf_counter()
    hidden, _, body, forward_s = _forward(
        segment, ids, ids, lengths, "fp16", {}, emulation, flops, DefenseSettings(), torch.Generator()
    )
    up = len(pack(body))
    time.sleep(emulation.uplink_s(up))
    grad = torch.randn_like(hidden) * 1e-3
    down = len(pack({"grad": grad.half().numpy().tobytes()}))
    time.sleep(emulation.downlink_s(down))
    backward_s = _backward(hidden, grad, optimizer, emulation, flops)
    elapsed = time.perf_counter() - started

    predicted = profile.compute_seconds(2 * flops) + profile.transfer_seconds(up, down)
    assert forward_s == profile.compute_seconds(flops) and backward_s == profile.compute_seconds(flops)
    assert abs(elapsed - predicted) <= 0.15 * predicted, (elapsed, predicted)
