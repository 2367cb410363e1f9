"""A thinking model offered tools (not forced) whose answer looks like a call but is none: the
thinking stays the reasoning, and the call-like text is the answer's content, every character of
it, never dropped (issue 31), on OpenAI chat, the Responses API and Ollama's chat, streamed and
not (each checked on its own: a repeated request may differ in a space the grammar allows). The
fixture model is test_thinking_api's "thinker" (SmolLM2, a thinking template, a budget that
closes the thinking deterministically); a response format that `auto` tools combine with the
calls' own grammar makes the answer, deterministically at temperature 0, a JSON object shaped
like a call that the reader must refuse: arguments that are a string but no JSON, or a function
that was not offered. A reply the token limit cuts among its calls keeps the call it completed,
and the call it cut short is content as it was written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from openai import OpenAI

from myllm.settings import Settings
from tests.server import running_servers
from tests.test_thinking_api import thinker_home

QUESTION = "What is the weather in Paris?"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}
TOOL = {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}
LOOKS_LIKE = {
    "arguments-that-do-not-parse": {"name": {"const": "get_weather"}, "arguments": {"type": "string"}},
    "a-function-not-offered": {"name": {"const": "delete_everything"}, "arguments": WEATHER},
}
"""The answer's schema: an object with a call's keys that is no call of an offered function."""
CALL = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
        "required": ["name", "arguments"], "additionalProperties": False}


def schema(kind: str) -> dict[str, Any]:
    return {"type": "object", "properties": LOOKS_LIKE[kind], "required": ["name", "arguments"],
            "additionalProperties": False}


def assert_call_like_but_none(content: str) -> None:
    """The answer is the whole JSON object the format asked for: a call's shape, but no call."""
    answer = json.loads(content)
    assert set(answer) == {"name", "arguments"}, content
    if answer["name"] == "get_weather":
        assert isinstance(answer["arguments"], str)
        with pytest.raises(ValueError):
            json.loads(answer["arguments"])


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    home = thinker_home(models_home, tmp_path_factory.mktemp("thinking-tool-text"))
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> OpenAI:
    return OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", timeout=120)


@pytest.mark.parametrize("kind", sorted(LOOKS_LIKE))
def test_openai_chat_call_like_text_is_content_and_thinking_the_reasoning(client: OpenAI, kind: str) -> None:
    request: dict[str, Any] = {
        "model": "thinker", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 60,
        "tools": [{"type": "function", "function": TOOL}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema(kind)}},
    }
    whole = client.chat.completions.create(**request)
    message, choice = whole.choices[0].message, whole.choices[0]
    thinking = getattr(message, "reasoning_content", None)
    assert thinking and message.content and not message.tool_calls and choice.finish_reason == "stop", whole
    assert "</think>" not in thinking + message.content and not thinking.lstrip().startswith("{")
    assert_call_like_but_none(message.content)

    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert_call_like_but_none("".join(d.content or "" for d in deltas))
    assert not [d for d in deltas if d.tool_calls] and chunks[-1].choices[0].finish_reason == "stop"


def test_responses_call_like_text_is_the_message_and_thinking_the_reasoning(client: OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "thinker", "input": QUESTION, "temperature": 0, "max_output_tokens": 60,
        "tools": [{"type": "function", **TOOL}],
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema("arguments-that-do-not-parse")}},
    }
    whole = client.responses.create(**request)
    assert [o.type for o in whole.output] == ["reasoning", "message"] and whole.status == "completed", whole
    reasoning = whole.output[0]
    assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
    assert_call_like_but_none(whole.output_text)

    events = list(client.responses.create(**request, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert_call_like_but_none("".join(e.delta for e in events if e.type == "response.output_text.delta"))
    assert not [e for e in events if e.type.startswith("response.function_call")]
    assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]


def test_ollama_chat_call_like_text_is_content_and_thinking_apart(urls: tuple[str, str]) -> None:
    client = ollama.Client(host=urls[1], timeout=120)
    request: dict[str, Any] = {
        "model": "thinker", "messages": [{"role": "user", "content": QUESTION}], "think": True,
        "tools": [{"type": "function", "function": TOOL}], "format": schema("arguments-that-do-not-parse"),
        "options": {"temperature": 0, "num_predict": 60},
    }
    whole = client.chat(**request)
    assert whole.message.thinking and not whole.message.tool_calls and whole.done_reason == "stop", whole
    assert_call_like_but_none(whole.message.content)
    parts = list(client.chat(**request, stream=True))
    assert "".join(p.message.thinking or "" for p in parts)
    assert_call_like_but_none("".join(p.message.content for p in parts))
    assert not [p for p in parts if p.message.tool_calls] and parts[-1].done_reason == "stop"


def test_a_reply_cut_among_its_calls_keeps_the_complete_one_and_the_cut_one_as_content(client: OpenAI) -> None:
    """Two calls asked for as an answer format (calls themselves are one, not parallel): the model
    writes both as an array, which the reader takes as calls; the token limit cuts the second."""
    request: dict[str, Any] = {
        "model": "thinker", "messages": [{"role": "user", "content": "What is the weather in Paris and in Rome?"}],
        "temperature": 0, "max_tokens": 40, "tools": [{"type": "function", "function": TOOL}], "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
            "type": "array", "items": CALL, "minItems": 2, "maxItems": 2}}},
    }
    whole = client.chat.completions.create(**request)
    message, choice = whole.choices[0].message, whole.choices[0]
    assert choice.finish_reason == "length" and getattr(message, "reasoning_content", None), whole
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []] == [
        ("get_weather", {"city": "Paris"})]
    assert_cut_call(message.content)

    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert [c.function.name for d in deltas for c in d.tool_calls or [] if c.function and c.function.name] == ["get_weather"]
    assert_cut_call("".join(d.content or "" for d in deltas))


def assert_cut_call(content: str | None) -> None:
    """The second call as the model wrote it until the limit: the start of an object, no call."""
    assert content and content.startswith("{") and "get_weather" in content, content
    with pytest.raises(ValueError):
        json.loads(content)
