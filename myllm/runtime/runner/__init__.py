"""Each loaded model instance runs in its own process (a *runner*), so a llama.cpp abort, a
signal or the OOM killer costs that one model, never the daemon; and an unload gives all of its
memory back to the OS. `client.py` is the daemon's side, `child.py` the process, `protocol.py`
what crosses between them."""

from myllm.runtime.runner.client import ModelRunner, RequestStream

__all__ = ["ModelRunner", "RequestStream"]
