"""Anthropic's Messages API (`/v1/messages`) with the official anthropic SDK against a real
daemon on the test models. The SDK no longer has sampling parameters of its own, so greedy
decoding (`temperature: 0`, which myllm still reads) goes in `extra_body`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import Message

from myllm.api.anthropic.routes import anthropic_error
from myllm.api.http.errors import from_domain
from myllm.errors import OutOfMemory, Overloaded
from myllm.settings import Settings
from tests.server import running_server

SMOL = "smollm2:135m"
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city", "unit"]}}
ADD = {"name": "add", "description": "Add two integers",
       "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                        "required": ["a", "b"]}}
SCHEMAS = {t["name"]: t["input_schema"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
COLORS = [{"role": "user", "content": "Name three colors."}]


def settings(home: Path, **extra: Any) -> Settings:
    return Settings(home=home, num_threads=2, num_ctx=2048, **extra)


@pytest.fixture(scope="module")
def url(models_home: Path) -> Iterator[str]:
    with running_server(settings(models_home)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)


def _tool_uses(message: Message) -> list[Any]:
    """The message's tool_use blocks, each checked: an Anthropic id, an offered tool, an input
    that validates against that tool's schema."""
    uses = [block for block in message.content if block.type == "tool_use"]
    for use in uses:
        assert use.id.startswith("toolu_") and use.name in SCHEMAS
        jsonschema.validate(use.input, SCHEMAS[use.name])
    return uses


def _sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each Server-Sent Event, as the stream framed them."""
    events, name = [], ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


# -- text --------------------------------------------------------------------------------------


def test_a_message_answers_text_with_usage(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=SMOL, max_tokens=40, messages=COLORS, extra_body=GREEDY)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == SMOL
    [block] = m.content
    assert block.type == "text" and block.text.strip()
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert 0 < m.usage.output_tokens < 40
    assert m.usage.input_tokens > 0 and m.usage.cache_read_input_tokens is not None


def test_max_tokens_cuts_the_reply(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=SMOL, max_tokens=3, messages=[{"role": "user", "content": "Tell a long story."}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_a_stop_sequence_is_named_and_never_in_the_text(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=SMOL, max_tokens=40, messages=COLORS, extra_body=GREEDY)
    text = full.content[0].text  # type: ignore[union-attr]
    words = text.split()
    stop = words[len(words) // 2]
    m = client.messages.create(model=SMOL, max_tokens=40, messages=COLORS, stop_sequences=["never-written", stop],
                               extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]


def test_a_last_assistant_turn_is_continued(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=SMOL, max_tokens=10, extra_body=GREEDY, messages=[
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"}])
    assert "Paris" in m.content[0].text  # type: ignore[union-attr]
    assert not m.content[0].text.startswith("The capital")  # type: ignore[union-attr]


def test_system_blocks_and_consecutive_turns_are_accepted(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="gemma3:270m", max_tokens=8, system=[{"type": "text", "text": "Be brief."}],
                               messages=[{"role": "user", "content": [{"type": "text", "text": "Hi."}]},
                                         {"role": "user", "content": "Name a color."}])
    assert m.content and m.usage.output_tokens > 0


# -- streaming ---------------------------------------------------------------------------------


def test_a_stream_gives_the_same_text_as_a_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=SMOL, max_tokens=30, messages=COLORS, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    whole = client.messages.create(model=SMOL, max_tokens=30, messages=COLORS, extra_body=GREEDY)
    assert text and final.content[0].text == text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.id.startswith("msg_") and final.model == SMOL


def test_raw_events_come_in_order_each_named_for_its_type(url: str) -> None:
    body = {"model": SMOL, "max_tokens": 40, "stream": True, "messages": COLORS, "temperature": 0,
            "stop_sequences": ["Green"]}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response)
    assert all(name == data["type"] for name, data in events)
    types = [name for name, _ in events]
    deltas = types.count("content_block_delta")
    assert deltas > 1
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    start, delta = events[0][1], events[-2][1]
    assert start["message"]["content"] == [] and start["message"]["usage"]["input_tokens"] > 0
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "Green"}
    assert delta["usage"]["output_tokens"] > 0
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text and "Green" not in text


def test_an_error_after_the_stream_started_is_an_error_event(url: str) -> None:
    body = {"model": SMOL, "max_tokens": 1500, "stream": True, "messages": [{"role": "user", "content": "Tell a long story."}]}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if "content_block_delta" in line:
                break
        assert httpx.post(f"{url}/api/models/{SMOL}/unload", timeout=60).status_code == 200
        rest = "\n".join(lines)
    assert "event: error" in rest and "message_stop" not in rest
    data = json.loads(rest.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert data["type"] == "error" and data["error"]["type"] == "overloaded_error" and "unloaded" in data["error"]["message"]


# -- tools -------------------------------------------------------------------------------------


def test_a_named_tool_is_the_one_used(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=SMOL, max_tokens=60, messages=ASK, tools=[WEATHER, ADD],
                               tool_choice={"type": "tool", "name": "add"})
    [use] = _tool_uses(m)
    assert use.name == "add" and m.stop_reason == "tool_use"


@pytest.mark.parametrize("model", [SMOL, "gemma3:270m"])
def test_any_tool_gives_one_valid_call(client: anthropic.Anthropic, model: str) -> None:
    m = client.messages.create(model=model, max_tokens=80, messages=ASK, tools=[WEATHER, ADD],
                               tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY)
    assert len(_tool_uses(m)) == 1 and m.stop_reason == "tool_use"


def test_any_tool_may_give_several_valid_calls(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=SMOL, max_tokens=120, messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
                               tools=[WEATHER], tool_choice={"type": "any"}, extra_body=GREEDY)
    assert _tool_uses(m) and m.stop_reason == "tool_use"


def test_any_tool_cut_by_max_tokens_keeps_its_complete_calls(client: anthropic.Anthropic) -> None:
    """`any` with parallel use allowed, cut by `max_tokens` in its third call: the two complete
    calls are tool_use blocks, no text block holds call text, the stop reason says why."""
    m = client.messages.create(model=SMOL, max_tokens=60, messages=ASK, tools=[WEATHER, ADD], tool_choice={"type": "any"},
                               extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and len(_tool_uses(m)) == 2, m
    assert not [b for b in m.content if b.type == "text" and b.text]


def test_a_streamed_tool_use_arrives_as_input_json_deltas(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=SMOL, max_tokens=80, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert deltas and set(deltas) == {"input_json_delta"}  # the call is not also text
    assert len(_tool_uses(final)) == 1 and final.stop_reason == "tool_use"


def test_a_tool_result_round_trip_answers(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model=SMOL, max_tokens=80, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY)
    [use] = _tool_uses(first)
    messages: list[Any] = [*ASK, first.to_param(), {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "18 C and sunny"}]}]}]
    answer = client.messages.create(model=SMOL, max_tokens=30, messages=messages, tools=[WEATHER],
                                    tool_choice={"type": "none"}, extra_body=GREEDY)
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text.strip()
    assert answer.stop_reason in ("end_turn", "max_tokens") and not _tool_uses(answer)


# -- count_tokens --------------------------------------------------------------------------------


def test_count_tokens_is_the_prompt_a_message_uses(client: anthropic.Anthropic) -> None:
    count = client.messages.count_tokens(model=SMOL, system="Be brief.", messages=COLORS).input_tokens
    m = client.messages.create(model=SMOL, max_tokens=1, system="Be brief.", messages=COLORS)
    assert count > 0 and m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == count
    with_tools = client.messages.count_tokens(model=SMOL, system="Be brief.", messages=COLORS, tools=[WEATHER])
    assert with_tools.input_tokens > count  # the tools are described in the prompt


# -- errors --------------------------------------------------------------------------------------


def test_an_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=5, messages=COLORS)
    assert info.value.status_code == 404
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=COLORS)


@pytest.mark.parametrize(("change", "says"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "input_schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
     "toolu_x"),
    ({"temperature": 9}, "temperature"),
])
def test_bad_requests_are_400_invalid_request_error(client: anthropic.Anthropic, change: dict[str, Any], says: str) -> None:
    body = {"model": SMOL, "max_tokens": 5, "messages": COLORS, **change}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", body={k: v for k, v in body.items() if v is not None}, cast_to=Message)
    error = info.value.body["error"]  # type: ignore[index]
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and says in error["message"], error


def test_a_full_queue_is_anthropics_529_and_no_memory_a_503() -> None:
    assert anthropic_error(from_domain(Overloaded("busy")))[0] == 529
    status, body = anthropic_error(from_domain(OutOfMemory("no room")))
    assert status == 503 and body == {"type": "error", "error": {"type": "overloaded_error", "message": "no room"}}


def test_api_keys_come_as_x_api_key_or_bearer(models_home: Path) -> None:
    with running_server(settings(models_home, api_keys="right-key")) as url:
        good = anthropic.Anthropic(base_url=url, api_key="right-key", max_retries=0, timeout=120)
        assert good.messages.count_tokens(model=SMOL, messages=COLORS).input_tokens > 0
        bearer = httpx.post(f"{url}/v1/messages/count_tokens", json={"model": SMOL, "messages": COLORS},
                            headers={"Authorization": "Bearer right-key"}, timeout=60)
        assert bearer.status_code == 200
        with pytest.raises(anthropic.AuthenticationError) as info:
            anthropic.Anthropic(base_url=url, api_key="wrong-key", max_retries=0).messages.create(
                model=SMOL, max_tokens=5, messages=COLORS)
    assert info.value.status_code == 401
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
