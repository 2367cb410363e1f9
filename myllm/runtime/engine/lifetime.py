"""Keeps llama.cpp objects alive while any thread is inside a call on them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from myllm.errors import ModelNotLoaded


class UseGuard:
    """Every call into llama.cpp runs inside `use()`, so freeing the model (after `close()`)
    never happens under a thread still using it: a request cancelled mid-tokenize leaves its
    thread running."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._users = 0
        self._closed = False
        self._cond = threading.Condition()

    @contextmanager
    def use(self) -> Iterator[None]:
        with self._cond:
            if self._closed:
                raise ModelNotLoaded(f"model '{self._name}' was unloaded")
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new users and wait for the current ones to leave."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._users == 0)
