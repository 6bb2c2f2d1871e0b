"""Device profiles: what one class of edge device can compute, hold and send.

A profile is a TOML file, one per device class, in the top-level ``firmware_profiles/`` folder::

    name = "jetson-nano"
    description = "NVIDIA Jetson Nano Developer Kit (4 GB)"

    [compute]
    peak_gflops = 472.0      # datasheet peak, in the dtype below
    efficiency = 0.25        # sustained fraction of the peak for small-batch transformer training
    dtype = "fp16"           # fp32 | fp16 | bf16

    [memory]
    total_mb = 4096
    usable_mb = 2800         # what one training process can use

    [link]
    uplink_mbps = 100.0      # megabits (10^6 bit) per second
    downlink_mbps = 150.0
    rtt_ms = 5.0

Every figure in a shipped file carries a comment naming its source. The sustained throughput is
not stored: it is ``peak_gflops * efficiency``. The profiles seed the cut-layer controller before
measurements arrive, and let one machine emulate a device.

Where the files are found: ``firmware_profiles/`` at the repository root in a checkout or an
editable install; a wheel installs the same files as the data package ``splitft.firmware_profiles``.
:func:`load_profile` also takes the path of any ``.toml`` file.
"""

from __future__ import annotations

import importlib.util
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitft.shared.errors import ConfigError

DTYPES = ("fp32", "fp16", "bf16")  # the names of precision.DTYPES (this module does not import torch)
# table -> key -> kind ("str", "float" or "int"); "" is the top level
_SCHEMA: dict[str, dict[str, str]] = {
    "": {"name": "str", "description": "str"},
    "compute": {"peak_gflops": "float", "efficiency": "float", "dtype": "str"},
    "memory": {"total_mb": "int", "usable_mb": "int"},
    "link": {"uplink_mbps": "float", "downlink_mbps": "float", "rtt_ms": "float"},
}


@dataclass(frozen=True)
class DeviceProfile:
    """One device class: peak compute and its sustained fraction, memory, and network link."""

    name: str
    description: str
    peak_gflops: float
    efficiency: float
    dtype: str
    total_mb: int
    usable_mb: int
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    source: Path | None = None

    @property
    def throughput_gflops(self) -> float:
        """Sustained training throughput in GFLOP/s: ``peak_gflops * efficiency``."""
        return self.peak_gflops * self.efficiency

    def compute_seconds(self, flops: float) -> float:
        """Seconds this device needs for ``flops`` floating-point operations at sustained throughput."""
        if flops < 0:
            raise ValueError(f"flops must be >= 0, got {flops}")
        return flops / (self.throughput_gflops * 1e9)

    def transfer_seconds(self, up_bytes: int, down_bytes: int) -> float:
        """Seconds to send ``up_bytes`` and receive ``down_bytes``, plus one round trip."""
        if up_bytes < 0 or down_bytes < 0:
            raise ValueError(f"byte counts must be >= 0, got {up_bytes} up, {down_bytes} down")
        up = up_bytes * 8 / (self.uplink_mbps * 1e6)
        down = down_bytes * 8 / (self.downlink_mbps * 1e6)
        return up + down + self.rtt_ms / 1000


def profiles_dir() -> Path:
    """The folder of shipped profiles: ``firmware_profiles/`` of the source tree, or the copy a wheel installs
    as the data package ``splitft.firmware_profiles``."""
    source = Path(__file__).resolve().parent.parent / "firmware_profiles"
    if source.is_dir():
        return source
    spec = importlib.util.find_spec("splitft.firmware_profiles")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else source


def list_profiles() -> list[str]:
    """Names (file stems) of the shipped profiles, sorted; empty when the folder is absent."""
    folder = profiles_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a profile by name from :func:`profiles_dir`, or from a ``.toml`` file path.

    A :class:`~pathlib.Path`, or a string ending in ``.toml`` or holding a path separator, is a path.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(name_or_path)
    else:
        path = profiles_dir() / f"{text}.toml"
        if not path.is_file():
            available = ", ".join(list_profiles()) or "none"
            raise ConfigError(f"unknown device profile {text!r}; available: {available}")
    if path.is_dir():
        raise ConfigError(f"device profile {path} is a folder, not a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"device profile file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read device profile: not UTF-8 text ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: cannot read device profile: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read device profile: {exc.strerror or exc}") from exc
    return parse_profile(data, source=path)


def server_rates(spec: str) -> tuple[float, float]:
    """A server's sustained rates in FLOP/s, (blocks, LM head), from ``spec``: a profile name or ``.toml`` file
    (its sustained throughput, for both), or ``"blocks,head"`` in TFLOP/s (one number: both)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a server is a profile name or 'blocks,head' in TFLOP/s, got {spec!r}")
    try:
        rates = [float(part) * 1e12 for part in spec.split(",")]
    except ValueError:
        profile = load_profile(spec.strip())
        return profile.throughput_gflops * 1e9, profile.throughput_gflops * 1e9
    if len(rates) > 2 or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ConfigError(f"server rates must be one or two positive numbers in TFLOP/s ('blocks,head'), got {spec!r}")
    return rates[0], rates[-1]


def parse_profile(data: Mapping[str, Any], source: Path | None = None) -> DeviceProfile:
    """Check a parsed profile against the schema and build it; every error names the file and the field."""
    where = f"{source}: " if source is not None else ""
    values: dict[str, Any] = {}
    for table, keys in _SCHEMA.items():
        section: Any = data.get(table) if table else data
        if section is None:
            raise ConfigError(f"{where}{table} is missing (a [{table}] table)")
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}{table} must be a table")
        prefix = f"{table}." if table else ""
        allowed = set(keys) | ({t for t in _SCHEMA if t} if not table else set())
        unknown = sorted(set(section) - allowed)
        if unknown:
            hint = " (derived: peak_gflops * efficiency)" if "throughput_gflops" in unknown else ""
            raise ConfigError(
                f"{where}unknown key(s) {', '.join(prefix + k for k in unknown)}{hint}; "
                f"allowed: {', '.join(sorted(prefix + k for k in allowed))}"
            )
        for key, kind in keys.items():
            if key not in section:
                raise ConfigError(f"{where}{prefix}{key} is missing")
            values[key] = _check(section[key], kind, f"{where}{prefix}{key}")
    if values["efficiency"] > 1:
        raise ConfigError(f"{where}compute.efficiency must be in (0, 1], got {values['efficiency']}")
    if values["dtype"] not in DTYPES:
        raise ConfigError(f"{where}compute.dtype must be one of {', '.join(DTYPES)}, got {values['dtype']!r}")
    if values["usable_mb"] > values["total_mb"]:
        raise ConfigError(
            f"{where}memory.usable_mb ({values['usable_mb']}) must not exceed memory.total_mb ({values['total_mb']})"
        )
    return DeviceProfile(**values, source=source)


def _check(value: Any, kind: str, field: str) -> Any:
    """``value`` as a non-empty string, or a finite number > 0 (an integer for ``int``)."""
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{field} must be a non-empty string, got {value!r}")
        return value
    numeric = (int,) if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise ConfigError(f"{field} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field} must be finite and > 0, got {value!r}")
    return float(value) if kind == "float" else value
