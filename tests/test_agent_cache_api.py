"""Agents resending their whole conversation through stateless APIs, more agents than the
model has slots, behind one long shared system prompt: from the second turn on each request
evaluates only its new tokens, and every API says how much it reused in its own field (OpenAI
`cached_tokens`, Anthropic `cache_read_input_tokens` with `cache_control` accepted, Ollama
`prompt_eval_cached_count`, Responses `input_tokens_details`), as does /metrics. Official clients
against a real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from myllm.runtime.engine.microbatch import ROWS
from myllm.settings import Settings
from tests.server import running_servers

MODEL = "smollm2:135m"
SYSTEM = ("You are a coding agent in a Python repository. Read files before you change them, keep changes "
          "small, run the tests after each change and report what failed. ") * 16
NEW_TURN = 40
"""More than any one turn adds: the last answer's closing tokens, the new message and the template around it."""


def only_new(evaluated: int) -> bool:
    """Whether a turn evaluated only what it added, or exactly one CPU attention tile's worth of
    rows, which the engine evaluates instead when that costs less (runtime/engine/microbatch.py)."""
    return evaluated <= NEW_TURN or evaluated == ROWS


@pytest.fixture(scope="module")
def urls(models_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=models_home, num_threads=2, num_ctx=2048, num_parallel=2)) as urls:
        yield urls


def kv_hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "myllm_kv_cache_hits_total" and s.labels.get("model", "").startswith("smollm2"))


def test_agents_over_fewer_slots_through_the_openai_api(urls: tuple[str, str]) -> None:
    main, _ = urls
    client = openai.OpenAI(base_url=f"{main}/v1", api_key="none")
    hits = kv_hits(main)
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(4)]
    for turn in range(3):
        for agent, history in enumerate(histories):
            history.append({"role": "user", "content": f"Agent {agent}, step {turn}: the test failed again. Next?"})
            r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
            assert r.usage and r.usage.prompt_tokens_details
            cached = r.usage.prompt_tokens_details.cached_tokens or 0
            if turn > 0:  # only what this turn added is evaluated, though two agents share each slot
                assert only_new(r.usage.prompt_tokens - cached), (agent, turn, r.usage)
            history.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    assert kv_hits(main) - hits >= 4  # conversations came back from RAM, not from their slots


def test_anthropic_turns_report_cache_reads(urls: tuple[str, str]) -> None:
    main, _ = urls
    client = anthropic.Anthropic(base_url=main, api_key="none")
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "List the files you would read first.",
                                              "cache_control": {"type": "ephemeral"}}]}]
    first = client.messages.create(model=MODEL, system=system, messages=messages, max_tokens=8)  # type: ignore[arg-type]
    messages += [{"role": "assistant", "content": first.content},  # type: ignore[list-item]
                 {"role": "user", "content": "And then?"}]
    second = client.messages.create(model=MODEL, system=system, messages=messages, max_tokens=8)  # type: ignore[arg-type]
    whole = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert (second.usage.cache_read_input_tokens or 0) >= whole - 2
    assert only_new(second.usage.input_tokens)


def test_ollama_reports_cached_prompt_tokens_as_ollama_does(urls: tuple[str, str]) -> None:
    _, ollama = urls
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which test should run first?"}]
    first = httpx.post(f"{ollama}/api/chat", json={"model": MODEL, "messages": messages, "stream": False,
                                                   "options": {"num_predict": 6, "temperature": 0}}, timeout=120).json()
    messages += [first["message"], {"role": "user", "content": "Why that one?"}]
    lines = []
    with httpx.stream("POST", f"{ollama}/api/chat", json={"model": MODEL, "messages": messages,
                                                         "options": {"num_predict": 6, "temperature": 0}}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    last = httpx.Response(200, content=lines[-1]).json()
    assert last["done"] and last["prompt_eval_count"] > first["prompt_eval_count"]  # the whole prompt, as Ollama counts
    assert only_new(last["prompt_eval_count"] - last["prompt_eval_cached_count"])
    cold = httpx.post(f"{ollama}/api/generate", json={"model": MODEL, "prompt": "Zebras graze quietly.", "raw": True,
                                                     "stream": False, "options": {"num_predict": 2}}, timeout=60).json()
    assert "prompt_eval_cached_count" not in cold  # left out when nothing was reused, as Ollama does


def test_responses_chain_reports_cached_input(urls: tuple[str, str]) -> None:
    main, _ = urls
    client = openai.OpenAI(base_url=f"{main}/v1", api_key="none")
    first = client.responses.create(model=MODEL, instructions=SYSTEM, input="Plan the fix.", max_output_tokens=8)
    second = client.responses.create(model=MODEL, instructions=SYSTEM, input="Go on.", previous_response_id=first.id,
                                     max_output_tokens=8)
    assert first.usage and second.usage
    assert only_new(second.usage.input_tokens - second.usage.input_tokens_details.cached_tokens)
