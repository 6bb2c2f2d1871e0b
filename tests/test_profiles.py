"""Device profiles: the shipped files load, are plausible and cite sources; every schema error is named."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from splitft.shared.errors import ConfigError
from splitft.shared.profiles import DeviceProfile, list_profiles, load_profile, parse_profile, profiles_dir

CLASSES = ["jetson-nano", "jetson-orin-nano", "jetson-agx-orin", "raspberry-pi-5", "laptop", "cpu-server"]

GOOD = """\
name = "test-board"
description = "a board for tests"

[compute]
peak_gflops = 100.0  # test
efficiency = 0.5
dtype = "fp32"

[memory]
total_mb = 4096
usable_mb = 3000

[link]
uplink_mbps = 8.0
downlink_mbps = 16.0
rtt_ms = 20.0
"""


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_profiles_dir_is_the_repository_folder() -> None:
    assert profiles_dir() == Path(__file__).resolve().parent.parent / "firmware_profiles"
    assert profiles_dir().is_dir()


def test_list_profiles_has_the_six_classes() -> None:
    names = list_profiles()
    assert set(CLASSES) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", CLASSES)
def test_shipped_profile_loads_and_cites_its_sources(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name and profile.source == profiles_dir() / f"{name}.toml"
    assert 0 < profile.efficiency <= 0.6, "sustained small-batch training is well below peak"
    assert profile.usable_mb < profile.total_mb
    assert profile.source is not None
    text = profile.source.read_text(encoding="utf-8")
    # every numeric figure has a comment on its own line; the peak names where it comes from
    for key in ("peak_gflops", "efficiency", "total_mb", "usable_mb", "uplink_mbps", "downlink_mbps", "rtt_ms"):
        line = re.search(rf"^{key}\s*=.*$", text, re.M)
        assert line and re.search(r"#\s*\S{3,}", line.group(0)), f"{name}: {key} has no source comment"
    peak = re.search(r"^peak_gflops\s*=.*#(.*)$", text, re.M)
    assert peak and re.search(r"datasheet|brief|spec|ARK|derived", peak.group(1), re.I)
    # anything assumed is said to be assumed
    assert "assumed" in re.search(r"^efficiency\s*=.*$", text, re.M).group(0)  # type: ignore[union-attr]


def test_shipped_profiles_are_plausible() -> None:
    p = {name: load_profile(name) for name in CLASSES}
    assert p["jetson-agx-orin"].throughput_gflops > p["jetson-orin-nano"].throughput_gflops
    assert p["jetson-orin-nano"].throughput_gflops > p["jetson-nano"].throughput_gflops
    assert p["jetson-nano"].throughput_gflops > p["raspberry-pi-5"].throughput_gflops
    assert p["cpu-server"].throughput_gflops > p["laptop"].throughput_gflops
    assert p["jetson-nano"].peak_gflops == 472.0  # the datasheet figure
    assert 7500 <= p["raspberry-pi-5"].total_mb <= 8192
    assert 3500 <= p["jetson-nano"].total_mb <= 4096
    assert p["jetson-agx-orin"].total_mb >= 60000
    assert p["cpu-server"].uplink_mbps > p["laptop"].uplink_mbps > p["raspberry-pi-5"].uplink_mbps
    assert all(q.dtype in ("fp16", "fp32") for q in p.values())
    assert p["raspberry-pi-5"].dtype == p["laptop"].dtype == p["cpu-server"].dtype == "fp32"


def test_arithmetic_on_a_known_profile(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, GOOD))
    assert isinstance(profile, DeviceProfile) and profile.source == tmp_path / "board.toml"
    assert profile.throughput_gflops == 50.0
    assert profile.compute_seconds(1e11) == pytest.approx(2.0)
    assert profile.compute_seconds(0) == 0.0
    # 1 MB up at 8 Mbit/s = 1 s; 2 MB down at 16 Mbit/s = 1 s; plus one 20 ms round trip
    assert profile.transfer_seconds(1_000_000, 2_000_000) == pytest.approx(2.02)
    assert profile.transfer_seconds(0, 0) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        profile.compute_seconds(-1)
    with pytest.raises(ValueError):
        profile.transfer_seconds(-1, 0)


def test_load_by_path_string_and_parse_without_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_profile(str(path)) == load_profile(path)
    profile = parse_profile(tomllib.loads(GOOD))
    assert profile.source is None and profile.usable_mb == 3000 and isinstance(profile.total_mb, int)
    assert isinstance(profile.rtt_ms, float)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('dtype = "fp32"', 'dtype = "fp32"\nturbo = true', r"unknown key\(s\) compute\.turbo"),
        ("efficiency = 0.5", "efficiency = 0.5\nthroughput_gflops = 50.0", r"compute\.throughput_gflops.*derived"),
        ('name = "test-board"', 'name = "test-board"\ncolour = "red"', r"unknown key\(s\) colour"),
        ("peak_gflops = 100.0  # test", "", r"compute\.peak_gflops is missing"),
        ("rtt_ms = 20.0", "", r"link\.rtt_ms is missing"),
        ('description = "a board for tests"', "", r"description is missing"),
        ("uplink_mbps = 8.0", "uplink_mbps = -8.0", r"link\.uplink_mbps must be finite and > 0"),
        ("total_mb = 4096", "total_mb = 0", r"memory\.total_mb must be finite and > 0"),
        ("peak_gflops = 100.0", "peak_gflops = nan", r"compute\.peak_gflops must be finite"),
        ("rtt_ms = 20.0", "rtt_ms = inf", r"link\.rtt_ms must be finite"),
        ("efficiency = 0.5", "efficiency = 1.5", r"compute\.efficiency must be in \(0, 1\]"),
        ("efficiency = 0.5", "efficiency = 0", r"compute\.efficiency must be finite and > 0"),
        ("usable_mb = 3000", "usable_mb = 5000", r"memory\.usable_mb \(5000\) must not exceed memory\.total_mb"),
        ("usable_mb = 3000", "usable_mb = 3000.5", r"memory\.usable_mb must be an integer"),
        ('dtype = "fp32"', 'dtype = "int8"', r"compute\.dtype must be one of fp32, fp16, bf16"),
        ("peak_gflops = 100.0", 'peak_gflops = "fast"', r"compute\.peak_gflops must be a number"),
        ("rtt_ms = 20.0", "rtt_ms = true", r"link\.rtt_ms must be a number"),
        ('name = "test-board"', 'name = ""', r"name must be a non-empty string"),
        ("[link]\n", "[network]\n", r"unknown key\(s\) network"),
    ],
)
def test_schema_error_names_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_missing_table_and_non_table(tmp_path: Path) -> None:
    text = GOOD.split("[link]")[0]
    with pytest.raises(ConfigError, match=r"board\.toml: link is missing"):
        load_profile(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"memory must be a table"):
        parse_profile({**tomllib.loads(GOOD), "memory": 3})


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("rtt_ms = 20.0", "rtt_ms = = 20"))
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_profile(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml does not exist"):
        load_profile(tmp_path / "nowhere.toml")
    with pytest.raises(ConfigError, match=r"nowhere\.toml does not exist"):
        load_profile(str(tmp_path / "nowhere.toml"))


def test_folder_and_binary_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"device profile {re.escape(str(tmp_path))} is a folder"):
        load_profile(tmp_path)
    path = tmp_path / "board.toml"
    path.write_bytes(b'name = "x"\n\xff\n')
    with pytest.raises(ConfigError, match=r"board\.toml: cannot read device profile: not UTF-8"):
        load_profile(path)


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown device profile 'jetson-tx9'; available: .*jetson-nano") as info:
        load_profile("jetson-tx9")
    assert all(name in str(info.value) for name in CLASSES)


def test_throughput_is_product_of_peak_and_efficiency() -> None:
    for name in CLASSES:
        p = load_profile(name)
        assert math.isclose(p.throughput_gflops, p.peak_gflops * p.efficiency)
