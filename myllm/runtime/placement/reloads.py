"""How often one key may make the manager load a model in a way that costs others: a load that
evicts an instance, or adds a second instance of a model already loaded with other options
(`num_ctx`, `num_gpu`). Without a bound, an inference key cycling those options loads a runner
per value and evicts everyone else's models (`MYLLM_RELOADS_PER_KEY`)."""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass

from myllm.errors import InvalidOptions, TooManyReloads

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
MAX_KEYS = 10_000
"""Keys whose loads are remembered; the least recently seen goes first."""


@dataclass(frozen=True)
class Rate:
    """A setting such as `120/minute` (the rate limit, wrong keys per address, reloads per key)."""

    requests: int
    period: float

    @classmethod
    def parse(cls, text: str, field: str) -> Rate:
        """`field`: the setting's name without its prefix (`rate_limit`), for the error."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(second|minute|hour)\s*", text)
        if not match or int(match.group(1)) < 1:
            raise InvalidOptions(f"MYLLM_{field.upper()} must look like 120/minute (got {text!r})", field=field)
        return cls(int(match.group(1)), PERIODS[match.group(2)])


class ReloadLimit:
    """A sliding window per key: at most `rate.requests` costly loads in any `rate.period` seconds."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._loads: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def take(self, key: str, model: str, now: float) -> None:
        """Count one costly load of `model` for `key`, or raise `TooManyReloads` (nothing is
        counted) saying when the key may load again."""
        times = self._loads.pop(key, None) or collections.deque()
        while times and times[0] <= now - self.rate.period:
            times.popleft()
        self._loads[key] = times
        while len(self._loads) > MAX_KEYS:
            self._loads.popitem(last=False)
        if len(times) >= self.rate.requests:
            wait = max(1, math.ceil(times[0] + self.rate.period - now))
            raise TooManyReloads(
                f"loading model '{model}' with these options would evict a loaded model or load it a second time, and "
                f"this key has caused {len(times)} such loads in the last {self.rate.period:g} s (MYLLM_RELOADS_PER_KEY); "
                f"use the options of the loaded instance, or retry in {wait} s", retry_after=wait)
        times.append(now)
