"""Checked reads of a message body's fields: every refusal a :class:`~splitft.shared.errors.WireError`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from splitft.shared.errors import Refusal, WireError


def get_field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in body:
        raise WireError(Refusal.BAD_SCHEMA, f"message lacks field {name!r}")
    value = body[name]
    # bool is an int in Python; never accept one for a number (nor an int for a bool).
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireError(Refusal.BAD_SCHEMA, f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise WireError(Refusal.BAD_SCHEMA, f"field {name!r} must be {kind}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError(Refusal.NONFINITE, f"field {name!r} is not finite")
    return value


def int_field(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = get_field(body, name, int)
    if not lo <= value <= hi:
        raise WireError(Refusal.BAD_SCHEMA, f"field {name!r} = {value} outside [{lo}, {hi}]")
    return int(value)


def number_field(body: Mapping[str, Any], name: str) -> float:
    return float(get_field(body, name, (int, float)))


def timings_field(body: Mapping[str, Any]) -> dict[str, float]:
    raw = get_field(body, "timings", dict)
    if len(raw) > 64 or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in raw.items()
    ):
        raise WireError(Refusal.BAD_SCHEMA, "timings must map at most 64 names to finite numbers")
    return {k: float(v) for k, v in raw.items()}
