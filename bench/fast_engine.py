"""make bench's fast-engine guard: myllm against llama-server on a tiny random-weight model with
SmolLM2's tokenizer, chat template and metadata (2 layers of width 64: one llama.cpp step takes
about a quarter of a millisecond on this CPU), the regime of a GPU, where each token's host work
(sampling over the 49,152-token vocabulary, detokenizing, the stream to the client) decides the
rate. Single stream and 1, 4 and 16 clients, 512 tokens each, on 16 sequences per server.

The model is written by bench/gpu/make_meta.py (SmolLM2's metadata and tensor list, from the
real file) and make_model.py --scale tiny (random Q8_0 weights of the tiny shape) into a
throwaway folder: a few seconds, about 5 MB.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from clients import aggregate, single_stream
from rounds import alternate, median, paired_ratio
from servers import running_pair

GPU_KIT = Path(__file__).resolve().parent / "gpu"
PARALLEL = 16  # sequences per server: MYLLM_NUM_PARALLEL and llama-server -np
CTX = 1024  # tokens per sequence: the prompt and an answer fit
LEVELS = (1, 4, 16)
# Tokens per stream: at ~1,500 tokens/s SmolLM2's 128 would be over in under 0.1 s, where one
# hiccup of the machine decides a sample.
TOKENS = 512


def tiny_model(real: Path, folder: Path) -> Path:
    """A tiny random-weight GGUF with `real`'s tokenizer and metadata, in `folder`."""
    subprocess.run([sys.executable, str(GPU_KIT / "make_meta.py"), str(real), str(folder)], check=True,
                   capture_output=True)
    out = folder / "tiny.gguf"
    subprocess.run([sys.executable, str(GPU_KIT / "make_model.py"), str(out), "--scale", "tiny",
                    "--meta", str(folder / "model_meta.gguf"), "--tensors", str(folder / "model_tensors.json")],
                   check=True, capture_output=True)
    return out


def measure_fast_engine(llama_server: str, real: Path, threads: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Per server: medians of decode and first token (one stream) and of aggregate decode per
    client count, every sample, and for myllm the medians of the rounds' ratios."""
    folder = Path(tempfile.mkdtemp(prefix="myllm-bench-tiny-"))
    try:
        gguf = tiny_model(real, folder)
        with running_pair(llama_server, gguf, "tiny:random", threads, CTX, PARALLEL) as servers:
            for server, model in servers.values():  # warm-up: load, first allocations
                asyncio.run(single_stream(server.url, model, tokens=TOKENS))
            single = alternate(servers, rounds, lambda url, m: asyncio.run(single_stream(url, m, tokens=TOKENS)))
            agg = {n: alternate(servers, rounds, lambda url, m, n=n: asyncio.run(aggregate(url, m, n, TOKENS)))
                   for n in LEVELS}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out: dict[str, dict[str, Any]] = {}
    for name in single:
        out[name] = {"single": {k: median([s[k] for s in single[name]]) for k in ("decode_tps", "ttft_ms")},
                     "aggregate": {str(n): median(agg[n][name]) for n in LEVELS},
                     "samples": {"single": single[name], **{f"aggregate_{n}": agg[n][name] for n in LEVELS}}}
    a, b = list(single)
    out[a]["paired_ratios"] = {
        "single": paired_ratio([s["decode_tps"] for s in single[a]], [s["decode_tps"] for s in single[b]]),
        "ttft": paired_ratio([s["ttft_ms"] for s in single[a]], [s["ttft_ms"] for s in single[b]]),
        **{f"aggregate_{n}": paired_ratio(agg[n][a], agg[n][b]) for n in LEVELS}}
    return out
