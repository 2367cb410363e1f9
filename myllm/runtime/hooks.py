"""What the runtime tells whoever watches it (the daemon's metrics): plain callbacks, no-ops
here, so the runtime needs no metrics library and a test needs no watcher."""

from __future__ import annotations

from myllm.runtime.engine_types import DoneEvent


class RuntimeEvents:
    def generation_done(self, model: str, done: DoneEvent) -> None:
        """A generation ended (its counts and timings measured in the runner)."""

    def model_loaded(self, model: str, seconds: float) -> None:
        """A runner finished loading `model`, which took `seconds`."""

    def model_unloaded(self, model: str, reason: str) -> None:
        """`reason`: `lru` (room for another), `keep_alive` (expired), `unload` (asked), `crash`."""
