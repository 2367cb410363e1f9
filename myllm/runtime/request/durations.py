"""Ollama-style durations: `5m`, `30s`, `1h30m`, `250ms`, a plain number of seconds.

Durations come from clients (`keep_alive` on every generation route), so the text is read by a
single left-to-right scan after a length cap: no regular expression, nothing that can backtrack.
"""

from __future__ import annotations

import math

from myllm.errors import InvalidOptions

_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

MAX_CHARS = 64
"""The longest duration text read. A format limit, not a resource bound: the longest sensible
duration (`-1`, `86400`, `1h30m15s250ms`) is a dozen characters, so nothing that is one is refused;
longer text is refused before it is read (and not quoted back in the error)."""

FOREVER = 10 * 365 * 24 * 3600.0
"""Durations of ten years or more mean "forever" (returned as -1), like a negative one."""


def parse_duration(value: str | int | float, field: str = "keep_alive") -> float:
    """Seconds; a negative result means "forever"."""
    seconds = _seconds(value, field)
    return -1.0 if seconds >= FOREVER else seconds


def _invalid(value: str, field: str) -> InvalidOptions:
    return InvalidOptions(f"invalid {field} {value!r}: use e.g. 30s, 5m, 1h, -1", field=field)


def _seconds(value: str | int | float, field: str) -> float:
    if isinstance(value, bool):
        raise InvalidOptions(f"invalid {field}: {value!r}", field=field)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidOptions(f"invalid {field}: {value!r}", field=field)
        return float(value)
    if len(value) > MAX_CHARS:
        raise InvalidOptions(
            f"invalid {field}: {len(value)} characters, more than the {MAX_CHARS} a duration may have "
            "(use e.g. 30s, 5m, 1h, -1)", field=field,
        )
    text = value.strip().lower()
    try:
        number = float(text)
    except ValueError:
        pass
    else:  # float() also reads "nan" and "inf", which are no duration (a NaN deadline never passes)
        if not math.isfinite(number):
            raise _invalid(value, field)
        return number
    negative = text.startswith("-")
    seconds = _units(text[1:] if negative else text)
    if seconds is None:
        raise _invalid(value, field)
    return -seconds if negative else seconds


def _units(text: str) -> float | None:
    """The seconds of `1h30m`-style text (numbers, each with a fraction or not, each followed by
    a unit), or None when it is not that. One pass over the characters; digits are ASCII ones
    (`str.isdigit` also takes `²`, which `float` does not read)."""
    total, i, n = 0.0, 0, len(text)
    if not text:
        return None
    while i < n:
        start = i
        while i < n and "0" <= text[i] <= "9":
            i += 1
        if i == start:
            return None
        if i < n and text[i] == ".":
            i += 1
            fraction = i
            while i < n and "0" <= text[i] <= "9":
                i += 1
            if i == fraction:
                return None
        number = float(text[start:i])
        unit = "ms" if text.startswith("ms", i) else text[i] if i < n else ""
        if unit not in _SCALE:
            return None
        total += number * _SCALE[unit]
        i += len(unit)
    return total
