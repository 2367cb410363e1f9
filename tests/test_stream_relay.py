"""Every streaming route of every API relays a failure after its first token the same way
(api/http/relay.py): the API's own in-band error event, then a clean end of the body, never a
cut connection; the model is free again. The failure is injected into the running server's
`GenerationStream`, after it handed out its first text: an unexpected exception (a bug, logged
with its traceback) and a domain error (answered with its own message, as before)."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from myllm.errors import ShuttingDown
from myllm.runtime.placement.report import per_model
from myllm.runtime.service import Event, GenerationStream, TokenEvent
from myllm.settings import Settings
from tests import server
from tests.server import in_server, running_servers

SMOL = "smollm2:135m"
PROMPT = "Once upon a time, in a land far away, there lived a dragon who"
"""Asked greedily (temperature 0), it never ends at once: some text always comes first."""
BUG = "relay test: a bug mid-stream"
DOMAIN = "the model is being unloaded"


@pytest.fixture(scope="module")
def urls(models_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=models_home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


def fail_after_first_text(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Every stream raises `error` when asked for the event after its first piece of text."""
    original = GenerationStream.__anext__
    spoke: weakref.WeakSet[GenerationStream] = weakref.WeakSet()

    async def failing(self: GenerationStream) -> Event:
        if self in spoke:
            raise error
        event = await original(self)
        if isinstance(event, TokenEvent) and event.text:
            spoke.add(self)
        return event

    monkeypatch.setattr(GenerationStream, "__anext__", failing)


@pytest.fixture(params=["bug", "domain"])
def failure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which failure the server's streams meet after their first text."""
    fail_after_first_text(monkeypatch, RuntimeError(BUG) if request.param == "bug" else ShuttingDown(DOMAIN))
    return str(request.param)


def active_requests() -> int:
    """Requests holding a model now: a stream left open would hold one."""
    assert server.LAST_APP is not None
    runtime = server.LAST_APP.state.services.runtime

    async def count() -> int:
        return sum(m.active for m in per_model(runtime.loaded()))

    return in_server(count())


# -- reading a body to its end (httpx raises on a cut connection or an incomplete chunked body) --


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of each Server-Sent Event, in order."""
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and data:
            events.append((name, "\n".join(data)))
            name, data = None, []
    assert not data, "the body ended inside an event"
    return events


def ndjson_lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.iter_lines() if line]


@dataclass(frozen=True)
class Route:
    """A streaming route, how to ask it, and what its in-band error says for each failure."""

    port: int
    """0: the main listener, 1: the Ollama listener."""
    path: str
    body: dict[str, Any]
    check: Callable[[httpx.Response, str], None]
    """Reads the whole body; asserts text came, then the API's error event last."""


def error_text(api: str, failure: str) -> str:
    if failure == "domain":
        return DOMAIN
    return "Token generation failed due to internal error" if api == "deepshiva" else "internal server error"


def check_openai(response: httpx.Response, failure: str) -> None:
    frames = [data for _, data in sse_events(response)]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-2]]
    assert any(c["choices"] and (c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text"))
               for c in chunks)
    error = json.loads(frames[-2])["error"]
    code = "internal_error" if failure == "bug" else ShuttingDown.code
    assert error == {"message": error_text("openai", failure), "type": "server_error", "param": None, "code": code}


def check_responses(response: httpx.Response, failure: str) -> None:
    events = [(name, json.loads(data)) for name, data in sse_events(response)]
    names = [name for name, _ in events]
    assert "response.output_text.delta" in names and not any(n in names for n in ("response.completed", "response.incomplete"))
    name, last = events[-1]
    assert name == "error" and last["type"] == "error" and last["message"] == error_text("openai", failure)
    assert last["code"] == ("internal_error" if failure == "bug" else ShuttingDown.code)
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))


def check_anthropic(response: httpx.Response, failure: str) -> None:
    events = [(name, json.loads(data)) for name, data in sse_events(response)]
    names = [name for name, _ in events]
    assert "content_block_delta" in names and "message_stop" not in names
    name, last = events[-1]
    kind = "api_error" if failure == "bug" else "overloaded_error"
    assert name == "error" and last == {"type": "error", "error": {"type": kind, "message": error_text("anthropic", failure)}}


def check_native(response: httpx.Response, failure: str) -> None:
    frames = [json.loads(data) for _, data in sse_events(response)]
    assert any(f.get("token") for f in frames[:-1]) and not any(f.get("full_text") is not None for f in frames)
    assert frames[-1] == {"error": error_text("native", failure), "done": True}


def check_ollama(response: httpx.Response, failure: str) -> None:
    lines = ndjson_lines(response)
    assert any((line.get("message") or {}).get("content") or line.get("response") for line in lines[:-1])
    assert not any(line.get("done") for line in lines)
    assert lines[-1] == {"error": error_text("ollama", failure)}


def check_deepshiva(response: httpx.Response, failure: str) -> None:
    events = sse_events(response)
    assert events[0][0] == "message" and events[0][1]
    assert "done" not in [name for name, _ in events]
    assert events[-1] == ("error", error_text("deepshiva", failure))


CHAT = [{"role": "user", "content": PROMPT}]
ROUTES = {
    "openai chat": Route(0, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True,
                                                     "stream_options": {"include_usage": True}}, check_openai),
    "openai completions": Route(0, "/v1/completions", {"model": SMOL, "prompt": [PROMPT, PROMPT], "max_tokens": 40,
                                                       "stream": True}, check_openai),
    "responses": Route(0, "/v1/responses", {"model": SMOL, "input": PROMPT, "max_output_tokens": 40, "temperature": 0, "stream": True},
                       check_responses),
    "anthropic messages": Route(0, "/v1/messages", {"model": SMOL, "messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True},
                                check_anthropic),
    "native chat": Route(0, "/api/chat", {"model": SMOL, "messages": CHAT, "options": {"max_tokens": 40, "temperature": 0}, "stream": True},
                         check_native),
    "native generate": Route(0, "/api/generate", {"model": SMOL, "prompt": PROMPT, "options": {"max_tokens": 40, "temperature": 0},
                                                  "stream": True}, check_native),
    "deepshiva stream": Route(0, "/stream", {"model": SMOL, "prompt": PROMPT, "max_length": 40, "temperature": 0}, check_deepshiva),
    "ollama chat": Route(1, "/api/chat", {"model": SMOL, "messages": CHAT, "options": {"num_predict": 40, "temperature": 0}}, check_ollama),
    "ollama generate": Route(1, "/api/generate", {"model": SMOL, "prompt": PROMPT, "options": {"num_predict": 40, "temperature": 0}},
                             check_ollama),
    "openai chat on the ollama port": Route(1, "/v1/chat/completions", {"model": SMOL, "messages": CHAT, "max_tokens": 40,
                                                                        "stream": True}, check_openai),
    "responses on the ollama port": Route(1, "/v1/responses", {"model": SMOL, "input": PROMPT, "max_output_tokens": 40,
                                                               "stream": True}, check_responses),
}


@pytest.mark.parametrize("name", ROUTES)
def test_a_failure_mid_stream_is_the_apis_error_event_then_a_clean_end(
    urls: tuple[str, str], failure: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    route = ROUTES[name]
    with caplog.at_level(logging.ERROR, logger="myllm"):
        with httpx.stream("POST", f"{urls[route.port]}{route.path}", json=route.body, timeout=120) as response:
            assert response.status_code == 200
            route.check(response, failure)
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is not None and str(r.exc_info[1]) == BUG]
    assert len(logged) == (1 if failure == "bug" else 0)  # a bug's traceback is in the log; a domain error is no bug
    assert active_requests() == 0


# -- what the official clients make of it --------------------------------------------------------


def test_the_openai_sdk_raises_the_error_of_a_failed_chat_stream(urls: tuple[str, str], failure: str) -> None:
    client = openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", max_retries=0, timeout=120)
    text = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model=SMOL, messages=CHAT, max_tokens=40, temperature=0, stream=True):  # type: ignore[arg-type]
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) and info.value.message == error_text("openai", failure)
    assert info.value.body["type"] == "server_error"  # type: ignore[index]


def test_the_openai_sdk_raises_the_error_of_a_failed_completion_stream(urls: tuple[str, str], failure: str) -> None:
    client = openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", max_retries=0, timeout=120)
    text = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True):
            text.append(chunk.choices[0].text)
    assert "".join(text) and info.value.message == error_text("openai", failure)


def test_the_openai_sdk_sees_the_error_event_of_a_failed_response_stream(urls: tuple[str, str], failure: str) -> None:
    client = openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="unused", max_retries=0, timeout=120)
    events = list(client.responses.create(model=SMOL, input=PROMPT, max_output_tokens=40, temperature=0, stream=True))
    assert events[0].type == "response.created" and any(e.type == "response.output_text.delta" for e in events)
    last = events[-1]
    assert last.type == "error" and last.message == error_text("openai", failure)


def test_the_anthropic_sdk_raises_the_error_of_a_failed_message_stream(urls: tuple[str, str], failure: str) -> None:
    client = anthropic.Anthropic(base_url=urls[0], api_key="unused", max_retries=0, timeout=120)
    text = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client.messages.stream(model=SMOL, max_tokens=40, messages=CHAT,  # type: ignore[arg-type]
                                    extra_body={"temperature": 0}) as stream:
            for piece in stream.text_stream:
                text.append(piece)
    assert "".join(text)
    kind = "api_error" if failure == "bug" else "overloaded_error"
    assert info.value.body == {"type": "error", "error": {"type": kind, "message": error_text("anthropic", failure)}}


@pytest.mark.parametrize("endpoint", ["chat", "generate"])
def test_the_ollama_client_raises_the_error_of_a_failed_stream(urls: tuple[str, str], failure: str, endpoint: str) -> None:
    client = ollama.Client(host=urls[1], timeout=120)
    text = []
    with pytest.raises(ollama.ResponseError) as info:
        if endpoint == "chat":
            for part in client.chat(model=SMOL, messages=CHAT, stream=True, options={"num_predict": 40, "temperature": 0}):
                text.append(part.message.content or "")
        else:
            for part in client.generate(model=SMOL, prompt=PROMPT, stream=True, options={"num_predict": 40, "temperature": 0}):
                text.append(part.response)
    assert "".join(text) and info.value.error == error_text("ollama", failure)
