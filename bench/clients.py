"""The client side of the plain figures, the same code for both servers: raw completions
through `/v1/completions` with streaming, timed at the client (time to first token, decode
rate of one stream, aggregate throughput of N simultaneous streams)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx
from servers import NO_KEEPALIVE

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle. Chapter 1:"
TTFT_SAMPLES = 45
"""Short requests a round for the time to first token, whose median the round reports. One
request's first token varies by ~10 % on a 2-core machine: with 9 a round, 30 rounds of SmolLM2
gave 5-round medians of the paired ratio from 1.02x to 1.25x; 45 take under a second a server."""


async def stream_completion(http: httpx.AsyncClient, model: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    started = time.perf_counter()
    first = last = ended = None
    chunks = 0
    tokens = None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"].get("completion_tokens")
            if data.get("choices") and data["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
            elif data.get("choices") and ended is None:
                ended = time.perf_counter()
    # A random-weight model's first tokens can be text-less (an end of generation, bytes of a
    # character not yet whole): the answer's first chunk then stands for its first token.
    first, last = first or ended, last or ended
    n = tokens or chunks
    assert first is not None and last is not None, f"no chunk from {http.base_url}"
    return {"ttft": first - started, "tokens": n, "decode": (n - 1) / (last - first) if last > first else 0.0,
            "end": last}


async def single_stream(url: str, model: str, extra: dict[str, Any] | None = None, tokens: int = 128) -> dict[str, float]:
    """Decode rate from one stream of `tokens`; time to first token as the median of
    `TTFT_SAMPLES` short requests after it (one first token a round swung from 15 to 46 ms with
    the machine)."""
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=NO_KEEPALIVE) as http:
        r = await stream_completion(http, model, tokens, extra or {})
        firsts = [(await stream_completion(http, model, 2, extra or {}))["ttft"] for _ in range(TTFT_SAMPLES)]
    return {"decode_tps": r["decode"], "ttft_ms": statistics.median(firsts) * 1000}


async def aggregate(url: str, model: str, clients: int, tokens: int = 96) -> float:
    """Tokens per second of `clients` streams of `tokens` each, started together."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(http, model, tokens, {}) for _ in range(clients)))
        wall = max(r["end"] for r in results) - started
    return sum(r["tokens"] for r in results) / wall
