"""The `/v1` API driven by the official openai package (sync and async clients), against a
real uvicorn with the test models."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from myllm.settings import Settings


@pytest.fixture
def client(server: str) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(server: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"smollm2:135m", "gemma3:270m"} <= ids
    model = client.models.retrieve("gemma3:270m")
    assert model.object == "model" and model.owned_by == "myllm" and model.created > 1_600_000_000
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope:1")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_chat_completion(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2:135m",
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}],
        max_tokens=16, temperature=0,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_finish_reason_length_and_max_completion_tokens(client: OpenAI) -> None:
    r = client.chat.completions.create(model="gemma3:270m", messages=[{"role": "user", "content": "Write an essay."}],
                                       max_completion_tokens=5, temperature=0.5)
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 5


def test_text_parts_and_stop(client: OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "List the days of the week: "},
                                             {"type": "text", "text": "Monday, Tuesday,"}]}]
    full = client.chat.completions.create(model="smollm2:135m", messages=messages, max_tokens=40, temperature=0)
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) > 3, text
    stop = words[2]
    cut = client.chat.completions.create(model="smollm2:135m", messages=messages, max_tokens=40, temperature=0, stop=[stop])
    assert stop not in (cut.choices[0].message.content or "")
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_chat(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "Tell me about cats."}], max_tokens=20,
        temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens == 20
    assert len(content) > 10 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_cached_tokens_and_timings_show_a_returning_conversation(client: OpenAI) -> None:
    """The second turn reuses the first turn's KV: usage.prompt_tokens_details.cached_tokens
    (OpenAI's field) counts those tokens, and `timings` (llama-server's extension) says how
    many were evaluated and how long that took."""
    messages = [{"role": "user", "content": "Name a fruit that is red."}]
    first = client.chat.completions.create(model="gemma3:270m", messages=messages, max_tokens=12, temperature=0)
    assert first.usage and first.usage.prompt_tokens_details
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "And one that is yellow?"}]
    chunks = list(client.chat.completions.create(model="gemma3:270m", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage and usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)
    timings = next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["timings"]  # type: ignore[index]
    assert timings["cache_n"] == cached and timings["prompt_n"] == usage.prompt_tokens - cached
    assert timings["predicted_n"] == usage.completion_tokens and timings["prompt_ms"] > 0
    whole = client.completions.create(model="gemma3:270m", prompt=["Red fruit:", "Yellow fruit:"], max_tokens=3,
                                      temperature=0)
    assert whole.model_extra["timings"]["predicted_n"] == whole.usage.completion_tokens == 6  # type: ignore[index,union-attr]


async def test_async_client(aclient: AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, temperature=0)
    assert r.choices[0].message.content
    pieces = []
    stream = await aclient.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=5, temperature=0, stream=True)
    async for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == r.choices[0].message.content
    embeddings = await aclient.embeddings.create(model="smollm2:135m", input="hello")
    assert len(embeddings.data[0].embedding) == 576


def test_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Say yes."}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"repeat_penalty": 1.0})
    entries = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries and len(entries) == r.usage.completion_tokens  # type: ignore[union-attr]
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy took the best
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "x"}],
                                       logprobs=True, top_logprobs=21)
    assert info.value.body["param"] == "top_logprobs"  # type: ignore[index]


def test_json_object_and_schema(client: OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Give me a JSON object with a cat's name."}],
                                       max_tokens=400, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                       "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3}},
        "required": ["name", "age", "colors"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=120,
        temperature=0.7, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    data = json.loads(r.choices[0].message.content or "")
    assert set(data) == {"name", "age", "colors"}
    assert isinstance(data["name"], str) and len(data["name"]) <= 20 and isinstance(data["age"], int)
    assert all(c in ("red", "green", "blue") for c in data["colors"]) and len(data["colors"]) <= 3


@pytest.mark.parametrize("schema", [{"enum": []}, {"type": "string", "pattern": "^\\d{1,3}$"}], ids=["empty-enum", "pattern-class"])
def test_schema_llama_cpp_cannot_compile_is_a_400(client: OpenAI, schema: dict) -> None:
    """llama.cpp answers a grammar it cannot parse with NULL, which in a sampler chain crashed
    the process (SIGSEGV); the grammar is compiled in the runner before the stream starts, so
    this is a 400 and the model goes on answering."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2:135m", messages=[{"role": "user", "content": "A number"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
    assert "could not compile the grammar" in info.value.body["message"]  # type: ignore[index]
    ok = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert ok.usage is not None and ok.usage.completion_tokens > 0


def _enum_schema(n: int, nested: bool) -> dict:
    """`n` values; nested in an object, they start with a sign the model would not write there, so
    that its picks do not fit and the grammar must be applied to the whole vocabulary."""
    values = {"enum": [f"¤{i}" if nested else f"value-{i}" for i in range(n)]}
    return {"type": "object", "properties": {"v": values}, "required": ["v"]} if nested else values


@pytest.mark.parametrize(("n", "nested", "message"), [
    (60_000, False, "more than 65536 characters"),  # refused before llama.cpp converts it
    (3_000, False, "a token on this model"),  # small enough, but its first token costs ~0.3 s
    (3_500, True, "took more than 0.05 s for one token"),  # cheap at first; ~0.33 s a token once the enum opens
], ids=["too-large", "too-costly", "costly-later"])
def test_a_grammar_that_would_stall_the_model_is_refused(api_settings: Settings, n: int, nested: bool, message: str) -> None:
    """Sampling runs on the model's one scheduler thread, so a grammar costing seconds a token
    made every other request on the model wait (a 60,000-value enum: 137 s for 11 tokens). Too
    large or too costly is a 400; the other client's chat, sent at the same time, answers. The
    daemon's limit is a twentieth of the default (MYLLM_GRAMMAR_TOKEN_MS), so that each costly case
    is several times over it, however fast the machine."""
    import concurrent.futures

    from tests.server import running_server

    with running_server(api_settings.model_copy(update={"grammar_token_ms": 50})) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            other = pool.submit(client.chat.completions.create, model="smollm2:135m", max_tokens=8,
                                messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(
                    model="smollm2:135m", messages=[{"role": "user", "content": "Pick one"}], max_tokens=12,
                    temperature=0,
                    response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": _enum_schema(n, nested)}},
                )
            assert message in info.value.body["message"], info.value.body  # type: ignore[index]
            answer = other.result(60)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_schema_with_a_lone_surrogate_is_a_400(client: OpenAI, server: str) -> None:
    """A pattern holding a lone surrogate (which JSON can carry as an escape but is no text;
    the openai client cannot even send it) is a 400, not a dead scheduler thread."""
    schema = {"type": "string", "pattern": "^\ud800$"}
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "A"}], "max_tokens": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    r = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    ok = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert ok.usage is not None and ok.usage.completion_tokens > 0


def test_keep_alive_extension(client: OpenAI, server: str) -> None:
    client.chat.completions.create(model="gemma3:270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                   extra_body={"keep_alive": 0})
    assert httpx.get(f"{server}/api/models/gemma3:270m").json()["loaded"] is False


def test_completions(client: OpenAI) -> None:
    r = client.completions.create(model="gemma3:270m", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage and r.usage.prompt_tokens == 6
    many = client.completions.create(model="gemma3:270m", prompt=["One, two,", "A, B,"], max_tokens=4, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    echoed = client.completions.create(model="gemma3:270m", prompt="One, two,", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "One, two," + many.choices[0].text
    lp = client.completions.create(model="gemma3:270m", prompt="One, two,", max_tokens=3, temperature=0, logprobs=2)
    assert lp.choices[0].logprobs and len(lp.choices[0].logprobs.tokens or []) == 3
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs or [])
    streamed = list(client.completions.create(model="gemma3:270m", prompt="One, two,", max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == many.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gemma3:270m", prompt="x", suffix="y")
    assert info.value.body["param"] == "suffix"  # type: ignore[index]


def test_embeddings(client: OpenAI) -> None:
    one = client.embeddings.create(model="smollm2:135m", input="hello world")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 576 and one.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="smollm2:135m", input=["a", "b", "c"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    tokens = client.embeddings.create(model="smollm2:135m", input=[[28120, 905], [28120]])
    assert len(tokens.data) == 2
    raw = httpx.post(f"{client.base_url}embeddings", json={"model": "smollm2:135m", "input": "hello world", "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2:135m", input=[[10**9]])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 7}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_p": -1}, "top_p"),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),  # the deprecated form of "tool"
    ],
)
def test_bad_requests(client: OpenAI, kwargs: dict, param: str) -> None:
    args = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    body = info.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param  # type: ignore[index]


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope:1", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize("content", [b"{broken", b'{"messages": "nope"}', b'{"model": 5, "messages": []}', b"[]"])
def test_never_422(server: str, content: bytes) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_v1_route_is_openai_shaped(server: str) -> None:
    r = httpx.get(f"{server}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_error_after_stream_start(server: str) -> None:
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={
        "model": "gemma3:270m", "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 2000, "temperature": 0, "stream": True}, timeout=60) as r:  # greedy: never short
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines)
        httpx.post(f"{server}/api/models/gemma3:270m/unload", timeout=30)
        rest = [line[6:] for line in lines]
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert "unloaded" in error["message"] and error["type"] == "server_error"
