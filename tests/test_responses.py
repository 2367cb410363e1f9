"""OpenAI's Responses API with the official openai SDK against a real daemon: stored responses,
chains through `previous_response_id` (a chain is a session), streaming events, function calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from openai import OpenAI

import tests.server
from myllm.settings import Settings
from tests.server import running_server

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def url(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.conftest import writable_home

    home = writable_home(models_home, tmp_path_factory.mktemp("responses") / "home")
    with running_server(Settings(home=home, num_threads=2, num_ctx=2048)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


def test_create_and_retrieve(client: OpenAI) -> None:
    r = client.responses.create(model="smollm2:135m", input="Say hello.", max_output_tokens=12, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text.strip() and r.output[0].type == "message"
    assert r.usage and r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text


def test_a_chain_puts_the_first_turn_before_the_second(client: OpenAI) -> None:
    first = client.responses.create(model="smollm2:135m", instructions="Answer briefly.",
                                    input="My name is Zanzibar. Remember it.", max_output_tokens=16, temperature=0)
    second = client.responses.create(model="smollm2:135m", previous_response_id=first.id,
                                     input="What is my name?", max_output_tokens=16, temperature=0)
    assert second.previous_response_id == first.id
    services = tests.server.LAST_APP.state.services  # type: ignore[union-attr]
    session, messages = services.responses.conversation(second.id)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert "Zanzibar" in messages[0].content and messages[1].content == first.output_text
    assert session == services.responses.conversation(first.id)[0], "one chain, one session"
    # The second prompt held the first turn: more input tokens, much of it reused from the cache.
    assert second.usage and first.usage and second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    # Continuing the first response again forks: the new branch does not see the second turn.
    fork = client.responses.create(model="smollm2:135m", previous_response_id=first.id, input="And my age?",
                                   max_output_tokens=4)
    fork_session, fork_messages = services.responses.conversation(fork.id)
    assert fork_session != session and len(fork_messages) == 4 and "my age" in fork_messages[2].content


def test_streaming_events(client: OpenAI) -> None:
    events = list(client.responses.create(model="smollm2:135m", input="Count to three.", max_output_tokens=12,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == f"response.{events[-1].response.status}", "response.completed, or .incomplete if cut"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output_text == text
    assert client.responses.retrieve(events[-1].response.id).output_text == text


LONG = "Write a long story about a lighthouse keeper."


def test_a_reply_cut_by_the_limit_is_incomplete_and_so_is_its_message(client: OpenAI) -> None:
    r = client.responses.create(model="smollm2:135m", input=LONG, max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.type == "message" and message.status == "incomplete" and r.output_text
    again = client.responses.retrieve(r.id)
    assert again.status == "incomplete" and [i.status for i in again.output] == ["incomplete"]
    whole = client.responses.create(model="smollm2:135m", input="Say hi.", max_output_tokens=200, temperature=0)
    assert whole.status == "completed" and [i.status for i in whole.output] == ["completed"]


def test_a_streamed_reply_cut_by_the_limit_ends_with_response_incomplete(client: OpenAI) -> None:
    events = list(client.responses.create(model="smollm2:135m", input=LONG, max_output_tokens=5, temperature=0,
                                          stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details and final.incomplete_details.reason == "max_output_tokens"
    [done] = [e.item for e in events if e.type == "response.output_item.done"]
    assert done.type == "message" and done.status == "incomplete"
    [added] = [e.item for e in events if e.type == "response.output_item.added"]
    assert added.status == "in_progress"
    assert [i.status for i in final.output] == ["incomplete"]
    assert [i.status for i in client.responses.retrieve(final.id).output] == ["incomplete"]


def test_a_function_call_and_its_output(client: OpenAI) -> None:
    r = client.responses.create(model="smollm2:135m", input="What's the weather in Paris?", tools=[WEATHER],
                                tool_choice="required", parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    [call] = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    answer = client.responses.create(model="smollm2:135m", previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}],
                                     max_output_tokens=24, temperature=0)
    assert answer.output_text.strip() and not [i for i in answer.output if i.type == "function_call"]


def test_streamed_function_call(client: OpenAI) -> None:
    events = list(client.responses.create(model="smollm2:135m", input="Weather in Rome?", tools=[WEATHER],
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                          temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(deltas), WEATHER["parameters"])
    assert events[-1].type == "response.completed"


def test_json_schema_text_format(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 20}}, "required": ["color"],
              "additionalProperties": False}
    r = client.responses.create(model="smollm2:135m", input="Name a color as JSON.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_store_false_and_delete(client: OpenAI) -> None:
    unstored = client.responses.create(model="smollm2:135m", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    stored = client.responses.create(model="smollm2:135m", input="Hi", max_output_tokens=2)
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(stored.id)
    assert info.value.status_code == 404 and "not found" in info.value.message


def test_errors_in_openais_shape(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="smollm2:135m", input="Hi", previous_response_id="resp_nope")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="smollm2:135m", input=[{"type": "image", "url": "x"}])  # type: ignore[list-item]
    assert info.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope:1", input="Hi")
