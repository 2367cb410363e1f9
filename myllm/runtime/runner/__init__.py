"""Each loaded model instance runs in its own process (a *runner*), so a llama.cpp abort, a
signal or the OOM killer costs that one model, never the daemon; and an unload gives all of its
memory back to the OS. `client.py` is the daemon's side, `child.py` the process, `protocol.py`
what crosses between them.

`ModelRunner` and `RequestStream` are imported from `client.py` when first asked for: the
runner process imports this package too (`python -m myllm.runtime.runner`), and the daemon's
side (asyncio, the request layer) would otherwise load in every runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from myllm.runtime.runner.client import ModelRunner, RequestStream

__all__ = ["ModelRunner", "RequestStream"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from myllm.runtime.runner import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
