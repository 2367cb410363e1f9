"""Agent traffic: K coding agents over a model with N slots, each resending its whole
conversation every turn through the stateless `/v1/chat/completions`, all behind one long
shared system prompt (as Claude Code, Cline or Aider do).

Each agent's turn is its history plus one new user message (a task, then "tool output"); the
agents run at once, each waiting for its answer before its next turn, or take turns one request
at a time; either way there are more conversations than slots, and a server must keep what the
slots cannot hold to evaluate only a turn's new tokens. Per turn and agent: the first token's
time at the client and the server's own `timings` (tokens evaluated, tokens reused), which
myllm and llama-server both report. `measure_agents` is make bench's agent phase.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from rounds import alternate, fresh_tag, median, paired_ratio
from servers import Pair

# About 2,000 tokens of SmolLM2's vocabulary: the kind of rules and tool list an agent sends
# before every conversation.
_RULES = [
    "Read the relevant files before you change them, and keep each change as small as the task allows.",
    "Run the project's tests after every change; when a test fails, read its output before you edit again.",
    "Never invent an API: look for its definition in the repository or in the installed packages first.",
    "Prefer the standard library and the project's existing helpers over new dependencies.",
    "Write type hints on every function and a docstring that says why the function exists.",
    "Keep commits small, with messages that say what changed and why, in the imperative mood.",
    "When a request is ambiguous, state the assumption you made in one sentence and go on.",
    "Report errors with the command that failed, its exit status and the last lines of its output.",
]
_TOOLS = ["read_file(path)", "write_file(path, text)", "run(command)", "search(pattern, folder)", "list(folder)",
          "diff(path)", "test(selector)", "format(path)"]


def system_prompt(target_tokens: int = 2000) -> str:
    """A deterministic system prompt of about `target_tokens` tokens (about 4 characters a
    token in SmolLM2's vocabulary: 10,121 characters made 2,491 tokens)."""
    parts = ["You are a careful software engineering agent working in a Python repository."]
    i = 0
    while sum(len(p) for p in parts) < target_tokens * 4:
        parts.append(f"Rule {i + 1}: {_RULES[i % len(_RULES)]} Tool {_TOOLS[i % len(_TOOLS)]} is available for it.")
        i += 1
    return "\n".join(parts)


def _turn_text(agent: int, turn: int, tag: str) -> str:
    if turn == 0:
        return f"[{tag}-{agent}] Task: fix the failing test number {agent} in tests/test_module_{agent}.py."
    return (f"Tool output for step {turn} of agent {agent}: ran `pytest tests/test_module_{agent}.py`, "
            f"{turn} passed, {agent % 3 + 1} failed with AssertionError on line {10 * turn + agent}. What next?")


async def _agent(http: httpx.AsyncClient, model: str, system: str, agent: int, turns: int, tag: str,
                 max_tokens: int) -> list[dict[str, float]]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    return [await _turn(http, model, messages, _turn_text(agent, turn, tag), max_tokens) for turn in range(turns)]


async def _turn(http: httpx.AsyncClient, model: str, messages: list[dict[str, str]], text: str,
                max_tokens: int) -> dict[str, float]:
    """One turn: `text` and the answer are appended to `messages`."""
    messages.append({"role": "user", "content": text})
    started = time.perf_counter()
    first = None
    reply: list[str] = []
    timings: dict[str, float] = {}
    usage: dict[str, Any] = {}
    async with http.stream("POST", "/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                timings = chunk.get("timings") or timings
                usage = chunk.get("usage") or usage
                piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    reply.append(piece)
    result = {"ttft_ms": ((first or time.perf_counter()) - started) * 1000,
              "prompt_tokens": float(usage.get("prompt_tokens", float("nan"))),
              "prompt_n": float(timings.get("prompt_n", float("nan"))),
              "cache_n": float(timings.get("cache_n", float("nan")))}
    messages.append({"role": "assistant", "content": "".join(reply)})
    return result


async def agent_turns(url: str, model: str, agents: int = 8, turns: int = 4, tag: str = "a",
                      system_tokens: int = 2000, max_tokens: int = 24, at_once: bool = True) -> list[list[dict[str, float]]]:
    """Per turn, per agent: `ttft_ms`, `prompt_tokens`, `prompt_n` (evaluated), `cache_n`."""
    system = system_prompt(system_tokens)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        if at_once:
            runs = await asyncio.gather(*(_agent(http, model, system, a, turns, tag, max_tokens) for a in range(agents)))
            return [[run[t] for run in runs] for t in range(turns)]
        histories = [[{"role": "system", "content": system}] for _ in range(agents)]
        return [[await _turn(http, model, histories[a], _turn_text(a, t, tag), max_tokens) for a in range(agents)]
                for t in range(turns)]


VARIANTS = {"taking_turns": False, "at_once": True}
"""The two ways the agents send: one request at a time (agent 1's turn, agent 2's, ...), and
all at once, each waiting only for its own answers."""
FIGURES = ("ttft_ms", "prompt_tokens", "prompt_n", "cache_n")


def measure_agents(servers: Pair, rounds: int, agents: int, turns: int) -> dict[str, dict[str, Any]]:
    """Both variants on both servers in turn (ABBA), `rounds` times, each round with a fresh
    tag in every agent's first message, so that a round finds nothing of an earlier one but the
    shared system prompt, whatever the server kept. Per server and variant: each figure's median
    per turn (over agents and rounds), the median first token of turns 2+ (over all of them and
    per round), and for the first server the median of the rounds' ratios of the latter."""
    out: dict[str, dict[str, Any]] = {name: {} for name in servers}
    for variant, at_once in VARIANTS.items():
        runs = alternate(servers, rounds, lambda url, model, at_once=at_once: asyncio.run(
            agent_turns(url, model, agents, turns, tag=fresh_tag(), at_once=at_once)))
        for name, samples in runs.items():
            per_turn = [[x for run in samples for x in run[t]] for t in range(turns)]
            out[name][variant] = {
                "per_turn": {k: [median([x[k] for x in turn]) for turn in per_turn] for k in FIGURES},
                "later_turns_ttft_ms": median([x["ttft_ms"] for turn in per_turn[1:] for x in turn]),
                "later_turns_ttft_ms_per_round": [median([x["ttft_ms"] for turn in run[1:] for x in turn])
                                                  for run in samples],
                "samples": samples}
    a, b = list(servers)
    for variant in VARIANTS:
        out[a][variant]["later_turns_paired_ratio"] = paired_ratio(
            out[a][variant]["later_turns_ttft_ms_per_round"], out[b][variant]["later_turns_ttft_ms_per_round"])
    return out
