"""How every repeated figure is taken and summarised: the servers in turn (ABBA order), medians
that skip figures a server does not report, and ratios paired by round."""

from __future__ import annotations

import math
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from servers import Pair

T = TypeVar("T")


def alternate(servers: Pair, rounds: int, fn: Callable[[str, str], T]) -> dict[str, list[T]]:
    """`fn(url, model)` for each server, `rounds` times, in ABBA order: a slow drift of the
    machine (other tenants, heat) falls on both servers alike."""
    samples: dict[str, list[T]] = {name: [] for name in servers}
    names = list(servers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            server, model = servers[name]
            samples[name].append(fn(server.url, model))
    return samples


def progress(phase: str) -> None:
    """One line on stderr as each phase starts (a full run takes many minutes)."""
    print(f"{time.strftime('%H:%M:%S')} {phase}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]  # NaN: a figure the server does not report
    return statistics.median(known) if known else math.nan


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of each round's a / b: the two were taken minutes apart at most, whereas the
    medians of each server alone drift with the machine."""
    return median([x / y for x, y in zip(a, b) if y])


def fresh_tag() -> str:
    """A few characters that make a round's prompts its own (nothing cached by an earlier round
    matches past them)."""
    return uuid.uuid4().hex[:4]
