"""Tool calls on /v1 with the official openai SDK and LangChain, and on Ollama's listener with
the ollama client, on the real test models (neither template renders tools: the fallback
prompt is what they see)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest
from openai import OpenAI

from myllm.settings import Settings
from tests.server import running_servers

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def urls(models_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=models_home, num_threads=2, num_ctx=2048)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> OpenAI:
    return OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", timeout=120)


def _valid(name: str, arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


@pytest.mark.parametrize("model", ["smollm2:135m", "gemma3:270m"])
def test_required_gives_a_valid_call(client: OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    _valid(call.function.name, call.function.arguments)


def test_a_named_function_is_the_one_called(client: OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2:135m", messages=ASK, tools=[WEATHER, ADD], max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    [call] = r.choices[0].message.tool_calls or []
    assert call.function.name == "add"
    _valid("add", call.function.arguments)


def test_parallel_calls_are_each_valid(client: OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
                                       tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0)
    calls = r.choices[0].message.tool_calls or []
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for call in calls:
        _valid(call.function.name, call.function.arguments)


def test_forced_calls_cut_by_the_token_limit_keep_the_complete_ones(client: OpenAI) -> None:
    """Forced, parallel calls on a small model run on until the limit: the complete calls come
    back as calls, the one it cut is dropped, and none of it is content (issue 28: all of it was
    text, so pydantic-ai retried until it gave up). At temperature 0 this model writes three
    calls in 78 tokens; 60 cut the third."""
    kwargs: dict[str, Any] = {"model": "smollm2:135m", "messages": ASK, "tools": [WEATHER, ADD],
                              "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content, choice
    calls = choice.message.tool_calls or []
    assert len(calls) == 2, calls
    for call in calls:
        _valid(call.function.name, call.function.arguments)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    streamed = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert {d.index for d in streamed} == {0, 1} and chunks[-1].choices[0].finish_reason == "length"


def test_none_gives_text(client: OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2:135m", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_deltas_assemble_into_one_valid_call(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="smollm2:135m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert {d.index for d in deltas} == {0} and len(deltas) > 2  # the name first, the arguments in pieces
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    _valid("get_weather", arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # the call is not also text


def test_a_round_trip_with_a_tool_result_answers(client: OpenAI) -> None:
    first = client.chat.completions.create(model="smollm2:135m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=0)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model="smollm2:135m", messages=messages, tools=[WEATHER], tool_choice="none",
                                            max_tokens=30, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_schema_format_with_tools_when_the_model_answers_text(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}}, "required": ["answer"]}
    r = client.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "Say hello as JSON with an 'answer' key."}],
        tools=[ADD], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    message = r.choices[0].message
    if message.tool_calls:  # `auto`: a call is allowed, and then it is a valid one
        for call in message.tool_calls:
            _valid(call.function.name, call.function.arguments)
    else:
        jsonschema.validate(json.loads(message.content or ""), schema)


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "n": 2}, "n"),
])
def test_bad_tools_are_a_400_naming_the_field(client: OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2:135m", messages=ASK, max_tokens=5, **extra)
    assert info.value.body["param"] == param, info.value.body  # type: ignore[index]


def test_langchain_bind_tools_yields_tool_calls(urls: tuple[str, str]) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2:135m", base_url=f"{urls[0]}/v1", api_key="unused", temperature=0, max_tokens=80)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What's the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], SCHEMAS["get_weather"])


def test_ollama_client_round_trips_a_tool_message(urls: tuple[str, str]) -> None:
    client = ollama.Client(host=urls[1], timeout=120)
    history = [*ASK, {"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
               {"role": "tool", "content": "18 C and sunny", "tool_name": "get_weather"}]
    reply = client.chat(model="smollm2:135m", messages=history, tools=[WEATHER], options={"num_predict": 30, "temperature": 0})
    assert reply.done and (reply.message.content or reply.message.tool_calls)
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
