"""A bounded RAM cache of KV states, so a conversation that comes back after others used the
model evaluates only its new tokens.

A llama.cpp sequence holds one conversation's KV at a time. When a request is about to
overwrite a sequence's KV (another conversation takes the sequence), that KV (llama.cpp's
per-sequence state, about 20 KiB per token for the test models) is first copied out with the
tokens it stands for; when a later prompt shares a longer prefix with a cached state than with
the sequence itself, the state moves back in. So the cache holds only conversations that no
sequence holds, and a conversation that keeps its sequence costs no copies. Least recently used
states go first when the byte budget is exceeded.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVState:
    tokens: tuple[int, ...]
    data: bytes


def common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVCache:
    def __init__(self, max_bytes: int, min_tokens: int = 32) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._states: OrderedDict[tuple[int, ...], KVState] = OrderedDict()
        self.bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._states)

    def best(self, tokens: list[int]) -> tuple[KVState | None, int]:
        """The cached state sharing the longest prefix with `tokens`, and that length."""
        best, length = None, 0
        for state in self._states.values():
            n = common_prefix(state.tokens, tokens)
            if n > length:
                best, length = state, n
        return best, length

    def save(self, lib: Any, ctx: Any, tokens: list[int], seq: int) -> None:
        """Copy sequence `seq`'s KV out of `ctx` (llama_cpp module `lib`), keyed by its tokens."""
        if self.max_bytes <= 0 or len(tokens) < self.min_tokens:
            return
        size = lib.llama_state_seq_get_size(ctx, seq)
        if size <= 0 or size > self.max_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(ctx, buffer, size, seq)
        if written <= 0:
            return
        key = tuple(tokens)
        # A state whose tokens are a prefix of this one's is superseded by it.
        for old_key in [k for k in self._states if len(k) <= len(key) and key[: len(k)] == k]:
            self.bytes -= len(self._states.pop(old_key).data)
        self._states[key] = KVState(key, bytes(buffer)[:written])
        self.bytes += written
        while self.bytes > self.max_bytes and self._states:
            _, evicted = self._states.popitem(last=False)
            self.bytes -= len(evicted.data)

    def restore(self, lib: Any, ctx: Any, state: KVState, seq: int) -> bool:
        """Replace sequence `seq`'s KV in `ctx` with `state`, which leaves the cache (the
        sequence holds it now, and it is saved again if the sequence is taken over); False if
        llama.cpp refused it."""
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), seq, -1, -1)
        buffer = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if lib.llama_state_seq_set_data(ctx, buffer, len(state.data), seq) == 0:
            lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), seq, -1, -1)
            return False
        self.bytes -= len(self._states.pop(state.tokens).data)
        self.hits += 1
        return True
