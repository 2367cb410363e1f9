"""Ollama's API on the second listener, driven by the official `ollama` client and LangChain's
`ChatOllama` / `OllamaEmbeddings` against a real daemon on the test models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

import tests.server
from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_servers

TOOL_TEMPLATE = (  # ChatML that renders tool definitions and calls, as tool-trained models' templates do
    "{% if tools %}<|im_start|>system\nYou may call: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(main URL, Ollama URL) of one daemon over a writable copy of the test models."""
    home = writable_home(models_home, tmp_path_factory.mktemp("ollama") / "home")
    registry = Registry.open(Settings(home=home))
    registry.copy("smollm2:135m", "tooly", Overrides(template_override=TOOL_TEMPLATE))
    registry.close()
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


def test_clients_find_ollama_running(urls: tuple[str, str]) -> None:
    _, url = urls
    assert httpx.get(url).text == "Ollama is running"
    assert httpx.head(url).status_code == 200
    assert httpx.get(f"{url}/api/version").json()["version"].count(".") == 2
    missing = httpx.get(f"{url}/api/nothing")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat(model="smollm2:135m", messages=messages, options={"temperature": 0, "num_predict": 12})
    assert whole.message.role == "assistant" and whole.message.content.strip()
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count and 0 < whole.eval_count <= 12 and whole.prompt_eval_count and whole.prompt_eval_count > 5
    assert whole.total_duration and whole.eval_duration and 0 < whole.eval_duration < whole.total_duration
    parts = list(client.chat(model="smollm2:135m", messages=messages, stream=True, options={"temperature": 0, "num_predict": 12}))
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content  # greedy: the same answer
    assert parts[-1].done_reason == whole.done_reason and parts[-1].eval_count == whole.eval_count


def test_generate_streamed_and_not(client: ollama.Client) -> None:
    whole = client.generate(model="smollm2:135m", prompt="Count: one, two,", raw=True, options={"temperature": 0, "num_predict": 5})
    assert whole.response.strip() and whole.done and whole.eval_count == 5 and whole.done_reason == "length"
    parts = list(client.generate(model="smollm2:135m", prompt="Count: one, two,", raw=True, stream=True,
                                 options={"temperature": 0, "num_predict": 5}))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done


def test_format_with_a_schema_gives_output_that_validates(client: ollama.Client) -> None:
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"]}
    r = client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "Name a city and its country as JSON."}],
                    format=schema, options={"temperature": 0, "num_predict": 60})
    data = json.loads(r.message.content)
    assert set(data) == {"city", "country"} and all(isinstance(v, str) for v in data.values())


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: ollama.Client, urls: tuple[str, str]) -> None:
    def loaded_models() -> list[str]:
        return [m["name"] for m in httpx.get(f"{urls[0]}/api/ps").json()["models"]]

    loaded = client.generate(model="gemma3:270m", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert "gemma3:270m" in loaded_models()
    unloaded = client.chat(model="gemma3:270m", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload" and unloaded.message.content == ""
    assert "gemma3:270m" not in loaded_models()


def test_ps_lists_a_model_once_however_many_instances_it_has(client: ollama.Client, urls: tuple[str, str]) -> None:
    """Its chat instance, a second one with a larger context and its embedding instance: one
    row on both ports (as Ollama lists models), adding up their memory and slots, the largest
    context, and the latest expiry (the embedding instance is kept for good)."""
    main, _ = urls
    client.generate(model="gemma3:270m", prompt="", keep_alive="10m")
    client.generate(model="gemma3:270m", prompt="Hi", options={"num_ctx": 2048, "num_predict": 1}, keep_alive="10m")
    client.embed(model="gemma3:270m", input="The cat sat.", keep_alive=-1)
    assert tests.server.LAST_APP is not None
    instances = [m for m in tests.server.LAST_APP.state.services.runtime.loaded() if m.name == "gemma3:270m"]
    assert sorted((m.embedding, m.context_length) for m in instances) == [(False, 1024), (False, 2048), (True, 1024)]
    try:
        [gemma] = [m for m in client.ps().models if m.model == "gemma3:270m"]
        assert gemma.size == sum(m.size_estimate for m in instances) and gemma.size_vram == 0
        assert gemma.context_length == 2048
        assert gemma.expires_at is not None and gemma.expires_at.year > 2200, "kept for good, as its embedding instance is"
        [native] = [m for m in httpx.get(f"{main}/api/ps").json()["models"] if m["name"] == "gemma3:270m"]
        assert native["size_mb"] == sum(m.size_estimate for m in instances) >> 20 and native["context_length"] == 2048
        assert native["slots"] == sum(m.slots for m in instances) and native["expires_at"] is None
        assert native["processor"] == "100% CPU" and native["layers"] == sum(m.layers for m in instances)
        scrape = httpx.get(f"{main}/metrics").text.splitlines()
        assert len([line for line in scrape if line.startswith('myllm_model_memory_bytes{model="gemma3:270m"}')]) == 1
    finally:
        httpx.post(f"{main}/api/models/gemma3:270m/unload", timeout=60)
    assert "gemma3:270m" not in [m.model for m in client.ps().models]


def test_embed_in_batch_and_the_older_route(client: ollama.Client) -> None:
    r = client.embed(model="smollm2:135m", input=["The cat sat.", "A dog ran.", "The cat sat."])
    assert len(r.embeddings) == 3 and len(r.embeddings[0]) == 576 and r.embeddings[0] == r.embeddings[2]
    assert r.prompt_eval_count and r.prompt_eval_count > 6
    short = client.embed(model="smollm2:135m", input="The cat sat.", dimensions=64)
    assert len(short.embeddings[0]) == 64 and abs(sum(x * x for x in short.embeddings[0]) - 1) < 1e-4
    long = client.embed(model="smollm2:135m", input="word " * 5000)  # truncated by default, as Ollama does
    assert len(long.embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="smollm2:135m", input="word " * 5000, truncate=False)
    assert info.value.status_code == 400 and "does not fit" in info.value.error
    old = client.embeddings(model="smollm2:135m", prompt="The cat sat.")
    assert len(old.embedding) == 576
    for nothing in ([], ""):  # Ollama answers no input with no vectors, for a model that exists
        assert client.embed(model="smollm2:135m", input=nothing).embeddings == []
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="nope:1", input=[])
    assert info.value.status_code == 404


def test_errors_in_ollamas_shape(client: ollama.Client, urls: tuple[str, str]) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope:1", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 404 and info.value.error == "model 'nope:1' not found"
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}], think=True)
    assert info.value.status_code == 400 and info.value.error == '"smollm2:135m" does not support thinking'
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "Hi", "images": [b"\x89PNG"]}])
    assert info.value.status_code == 400 and "does not support images" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="smollm2:135m", prompt="Hi", options={"temperature": 9})
    assert info.value.status_code == 400 and "temperature" in info.value.error
    # Ollama's llama.cpp knobs are accepted and left to the daemon.
    r = client.generate(model="smollm2:135m", prompt="Hi", options={"num_thread": 1, "num_gpu": 0, "num_predict": 2})
    assert r.done
    bad = httpx.post(f"{urls[1]}/api/chat", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as info:  # no registry to push to (README: what differs)
        client.push("smollm2:135m")
    assert info.value.status_code == 404


def test_langchain_chat_ollama_and_embeddings(urls: tuple[str, str]) -> None:
    from langchain_ollama import ChatOllama, OllamaEmbeddings

    llm = ChatOllama(model="smollm2:135m", base_url=urls[1], temperature=0, num_predict=12)
    answer = llm.invoke("What is the capital of France?")
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.usage_metadata and answer.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("What is the capital of France?"))
    assert "".join(c.content for c in chunks) == answer.content
    embedder = OllamaEmbeddings(model="smollm2:135m", base_url=urls[1])
    vectors = embedder.embed_documents(["The cat sat.", "A dog ran."])
    assert len(vectors) == 2 and len(vectors[0]) == 576
    assert embedder.embed_query("The cat sat.") == vectors[0]


def test_tools_and_tool_messages_are_rendered_through_the_template(client: ollama.Client) -> None:
    """The fields Ollama clients send for tools are accepted and reach the model's template
    (the prompt grows by them); parsing calls out of replies is the tool-call layer's."""
    tools = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    question = {"role": "user", "content": "Weather in Paris?"}
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    result = {"role": "tool", "content": "18 C, sunny", "tool_name": "weather"}
    options = {"num_predict": 1}
    plain = client.chat(model="tooly", messages=[question], options=options).prompt_eval_count or 0
    with_tools = client.chat(model="tooly", messages=[question], tools=tools, options=options).prompt_eval_count or 0
    with_calls = client.chat(model="tooly", messages=[question, call, result], tools=tools, options=options).prompt_eval_count or 0
    assert plain < with_tools < with_calls
    assert with_tools - plain > 30  # the whole definition


def test_bodies_without_a_content_type_are_json_on_ollamas_port(urls: tuple[str, str]) -> None:
    """Ollama reads a body sent without `Content-Type` as JSON, and litellm's `ollama/` and
    `ollama_chat/` providers send exactly that (issue 28); the main port still asks for the
    header, and a page of another site is still refused (a browser always sends `Origin`)."""
    main, url = urls
    chat = json.dumps({"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                       "options": {"num_predict": 2}}).encode()
    r = httpx.post(f"{url}/api/chat", content=chat, timeout=120)
    assert r.status_code == 200 and r.json()["message"]["role"] == "assistant", r.text[:300]
    generate = json.dumps({"model": "smollm2:135m", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    assert httpx.post(f"{url}/api/generate", content=generate.encode(), timeout=120).json()["done"] is True
    assert httpx.post(f"{url}/api/show", content=b'{"model": "smollm2:135m"}', timeout=30).status_code == 200
    assert httpx.post(f"{url}/api/chat", content=b'{"model": ', timeout=30).status_code == 400  # still parsed
    assert httpx.post(f"{main}/api/chat", content=chat, timeout=30).status_code == 400
    page = httpx.post(f"{url}/api/chat", content=chat, headers={"Origin": "http://evil.example"}, timeout=30)
    assert page.status_code == 403


def test_ollamas_port_serves_the_openai_api(urls: tuple[str, str]) -> None:
    """Clients default to `http://localhost:11434/v1` (pydantic-ai's OllamaProvider, dspy's
    `ollama_chat/`): chat and text completions, embeddings, models and Responses there, with
    OpenAI's error shape (issue 28)."""
    _, url = urls
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="ollama", max_retries=0, timeout=120)
    assert "smollm2:135m" in [m.id for m in client.models.list()]
    chat = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3)
    assert chat.choices[0].message.role == "assistant" and chat.usage is not None
    streamed = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, stream=True)
    assert any(part.choices and part.choices[0].delta.content for part in streamed)
    assert client.completions.create(model="smollm2:135m", prompt="Once", max_tokens=2).choices[0].text
    assert len(client.embeddings.create(model="smollm2:135m", input=["a", "b"]).data) == 2
    assert client.responses.create(model="smollm2:135m", input="Hi", max_output_tokens=16).output_text is not None
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
