"""Emulating a device class: a step reports what the profile predicts, and never takes less."""

from __future__ import annotations

from splitft.bench import emulation as bench_emulation
from splitft.shared.model.loading import block_flops, block_params, load_config
from splitft.shared.model.split import SegmentSpec, build_segment


def test_block_params_match_the_model() -> None:
    for preset in ("tiny-gpt2", "tiny-llama"):
        segment = build_segment(preset, SegmentSpec.client(1))
        counted = sum(
            p.numel()
            for n, p in segment.peft_model.named_parameters()
            if ".0." in n and "lora" not in n and p.dim() == 2
        )
        assert block_params(load_config(preset)) == counted, preset


def test_emulated_step_reports_the_profile_and_never_runs_early() -> None:
    """The emulated board reports exactly the profile's compute time for each phase, and the step on the
    wall clock is never shorter than the profile predicts (how much longer, with the host's load, is
    scripts/bench_emulation.py's to measure)."""
    profile = bench_emulation.slow_board()
    flops = block_flops(load_config("tiny-gpt2"), 1, 32)  # 13 MFLOP: 1.3 s per phase on this board
    elapsed, predicted, forward_s, backward_s = bench_emulation.timed_step(profile, length=32)
    assert forward_s == profile.compute_seconds(flops) and backward_s == profile.compute_seconds(flops)
    assert predicted > 2 * profile.compute_seconds(flops)  # the link's time is in the prediction too
    assert elapsed >= predicted * (1 - 1e-6), (elapsed, predicted)
