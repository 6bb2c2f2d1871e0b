"""The latency estimates the controller decides from: link measured from uploads, changes detected,
the adapter exchange, and the bytes assumed before a device's first report."""

from __future__ import annotations

import math

import pytest

from splitft.coordinator.controller import ServerEstimate
from splitft.coordinator.estimates import CHANGE_RATIO, Ewma, FleetEstimates, adapter_block_bytes
from splitft.shared.model.split import SegmentSpec, build_segment

WIFI = {"uplink_mbps": 100.0, "downlink_mbps": 200.0, "rtt_ms": 10.0, "usable_mb": 4096}


def estimates(**kwargs: object) -> FleetEstimates:
    return FleetEstimates(0.3, ServerEstimate(block_s=0.01, head_s=0.02), block_mb=10.0, **kwargs)  # type: ignore[arg-type]


def report(block_s: float, upload_s: float, nbytes: float = 1e6) -> dict[str, float]:
    return {"block_s": block_s, "bytes_up": nbytes, "bytes_down": nbytes, "upload_s": upload_s}


def test_uploads_as_fast_as_the_profile_keep_the_profiles_link() -> None:
    e = estimates()
    e.observe_device("d", report(0.1, upload_s=1e6 * 8 / 100e6 + 0.005), WIFI, None)
    d = e.device("d")
    assert d is not None and d.uplink_bps == 100e6 and d.downlink_bps == 200e6 and d.rtt_s == 0.01
    e.observe_device("virtual", report(0.1, upload_s=1e-6), WIFI, None)  # a virtual link reports no wait
    v = e.device("virtual")
    assert v is not None and v.uplink_bps == 100e6


def test_a_link_that_degrades_is_seen_in_the_timed_uploads() -> None:
    e = estimates()
    e.observe_device("d", report(0.1, upload_s=0.085), WIFI, None)
    cellular = 1e6 * 8 / 2e6 + 0.005  # the same bytes over 2 Mbit/s
    e.observe_device("d", report(0.1, upload_s=cellular), WIFI, None)
    d = e.device("d")
    assert d is not None
    assert d.uplink_bps == pytest.approx(2e6)  # a 47x slower upload replaces the estimate at once
    assert d.downlink_bps == pytest.approx(200e6 * 2e6 / 100e6)  # the downlink slowed in the same proportion
    # A device that knows no link of its own gets the measured one both ways.
    e.observe_device("bare", report(0.1, upload_s=0.08), {}, None)
    bare = e.device("bare")
    assert bare is not None and bare.uplink_bps == pytest.approx(1e8) == bare.downlink_bps


def test_a_change_replaces_the_estimate_and_noise_is_smoothed() -> None:
    smooth = Ewma(0.3)
    for x in (1.0, 1.2, 0.9):
        smooth.update(x)
    assert 0.9 < smooth.value < 1.2  # type: ignore[operator]
    throttled = Ewma(0.3, 1.0)
    assert throttled.update(1.0 * CHANGE_RATIO) == CHANGE_RATIO  # a device at half speed: taken at once
    assert throttled.update(1.0) == 1.0  # and back
    assert Ewma(0.3, 1.0).update(1.5) == pytest.approx(1.15)


def test_before_its_first_report_a_device_is_planned_with_the_jobs_bytes_and_adapters() -> None:
    e = estimates(adapter_block_bytes=2.6e5, local_steps=4, step_bytes=(4e5, 3.9e5))
    e.observe_join("new", {**WIFI, "block_s": 0.05, "block_tokens": 512}, 1024)
    d = e.device("new")
    assert d is not None
    assert d.block_s == pytest.approx(0.1) and (d.up_bytes, d.down_bytes) == (4e5, 3.9e5)
    assert d.per_block_s == pytest.approx(0.1 + 2.6e5 * 8 * (1 / 100e6 + 1 / 200e6) / 4)
    assert estimates().device("unknown") is None


def test_adapter_block_bytes_are_one_blocks_adapters_in_fp32() -> None:
    segment = build_segment("tiny-gpt2", SegmentSpec.client(2))
    parameters = segment.lora_parameters()
    total = sum(p.numel() for p in parameters.values())
    assert adapter_block_bytes(parameters) == pytest.approx(4 * total / 2)
    assert adapter_block_bytes({}) == 0.0
    assert math.isfinite(adapter_block_bytes(parameters))


def test_the_u_split_tells_the_controller_each_devices_tail() -> None:
    """A U-split job's estimates carry each device's tail depth (the queue runs it between the server's two
    passes); a two-part job's carry none."""
    tails = {"deep": 3}
    u = estimates(round_trips=2, tail_of=lambda name: tails.get(name, 1))
    two_part = estimates()
    for e in (u, two_part):
        for name in ("deep", "other"):
            e.observe_device(name, report(0.1, upload_s=0.1), WIFI, None)
    assert [u.device(n).tail_blocks for n in ("deep", "other")] == [3, 1]  # type: ignore[union-attr]
    assert two_part.device("deep").tail_blocks is None  # type: ignore[union-attr]
