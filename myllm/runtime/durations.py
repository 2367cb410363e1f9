"""Ollama-style durations: `5m`, `30s`, `1h30m`, `250ms`, a plain number of seconds."""

from __future__ import annotations

import math
import re

from myllm.errors import InvalidOptions

_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


FOREVER = 10 * 365 * 24 * 3600.0
"""Durations of ten years or more mean "forever" (returned as -1), like a negative one."""


def parse_duration(value: str | int | float, field: str = "keep_alive") -> float:
    """Seconds; a negative result means "forever"."""
    seconds = _seconds(value, field)
    return -1.0 if seconds >= FOREVER else seconds


def _seconds(value: str | int | float, field: str) -> float:
    if isinstance(value, bool):
        raise InvalidOptions(f"invalid {field}: {value!r}", field=field)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidOptions(f"invalid {field}: {value!r}", field=field)
        return float(value)
    text = value.strip().lower()
    try:
        number = float(text)
    except ValueError:
        pass
    else:  # float() also reads "nan" and "inf", which are no duration (a NaN deadline never passes)
        if not math.isfinite(number):
            raise InvalidOptions(f"invalid {field} {value!r}: use e.g. 30s, 5m, 1h, -1", field=field)
        return number
    negative = text.startswith("-")
    body = text.lstrip("-")
    parts = _PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise InvalidOptions(f"invalid {field} {value!r}: use e.g. 30s, 5m, 1h, -1", field=field)
    seconds = sum(float(n) * _SCALE[u] for n, u in parts)
    return -seconds if negative else seconds
