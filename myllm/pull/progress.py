"""Progress reporting for pulls, independent of how it is shown (Rich bar, logs, nothing)."""

from __future__ import annotations

from typing import Protocol


class PullProgress(Protocol):
    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """`stage` is one of: downloading, copying, assembling, verifying (hashing
        bytes), checking (reading GGUF metadata; no byte count)."""


def silent(stage: str, done: int, total: int | None) -> None:
    pass
