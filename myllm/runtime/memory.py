"""How much memory a loaded model takes: estimated before a load, measured after it.

estimate = runner process + weights + KV cache + compute buffers, where
  runner  = 80 MiB: the Python interpreter, numpy and llama.cpp's libraries of the model's own
            process (measured: ~79 MiB resident before the model loads),
  weights = the GGUF file size (llama.cpp maps it whole),
  KV      = layers x KV heads x (key size + value size) x 2 bytes (f16) x context,
  compute = 16 MiB + 160 bytes x vocabulary (logits and graph scratch; fitted to llama.cpp's
            CPU buffers for SmolLM2 and Gemma 3 at 512-8192 context, within a few MiB),
  embedding contexts add 32 MiB + 4 bytes x embedding size x context for pooled outputs,
  and a generation instance adds its saved-conversation KV cache (MYLLM_KV_CACHE) in full.
Each runner's RSS is measured too, and the manager counts whichever of the two is larger (see
`ModelManager.used()`), so an estimate that is too low cannot overfill the budget for long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil

from myllm.registry.schema import ModelRow

MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_memory(value: str | int, available: int | None = None) -> int:
    """Bytes from `6GiB`, `512MB`, `1073741824` or `75%` (of memory available now)."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    if text.endswith("%"):
        pct = float(text[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"memory percentage must be in (0, 100]: {value!r}")
        base = available if available is not None else psutil.virtual_memory().available
        return int(base * pct / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r} (try 6GiB, 512MB or 75%)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


RUNNER_OVERHEAD = 80 * MiB


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int
    process: int = RUNNER_OVERHEAD

    @property
    def total(self) -> int:
        return self.process + self.weights + self.kv_cache + self.compute


def estimate(row: ModelRow, n_ctx: int, embedding: bool = False, kv_cache: int = 0) -> MemoryEstimate:
    d = row.details or {}
    layers = int(d.get("block_count") or 0)
    heads = int(d.get("attention.head_count") or 1)
    kv_heads = int(d.get("attention.head_count_kv") or heads)
    n_embd = int(row.embedding_length or d.get("embedding_length") or 0)
    key = int(d.get("attention.key_length") or (n_embd // heads if heads else 0))
    value = int(d.get("attention.value_length") or key)
    kv = layers * kv_heads * (key + value) * 2 * n_ctx
    compute = 16 * MiB + 160 * int(row.vocab_size or 0)
    if embedding:
        compute += 32 * MiB + 4 * n_embd * n_ctx
    return MemoryEstimate(int(row.size), kv + kv_cache, compute)


def release_freed_memory() -> None:
    """Hand memory freed by an unloaded model back to the OS. Without it glibc keeps ~90 MiB
    of freed llama.cpp buffers per cycle in its arenas, and RSS drifts above the budget."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
