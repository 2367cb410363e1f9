"""A thinking model through the APIs, with the official clients against a real daemon. No small
thinking model is on the package index: the fixture is SmolLM2 with a Qwen3-style template (it
opens the reasoning section at the start of the answer, or closes it empty when thinking is
off) and a thinking budget as a Modelfile PARAMETER, after which the engine closes the section
itself, so the split is deterministic at temperature 0."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from myllm.registry.store import Overrides, Registry
from myllm.settings import Settings
from tests.conftest import writable_home
from tests.server import running_servers

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)
BUDGET = 6
DAEMON_BUDGET = 3
QUESTION = [{"role": "user", "content": "What is two and two?"}]
GREEDY = {"temperature": 0, "num_predict": 40}


def thinker_home(models_home: Path, folder: Path) -> Path:
    """A writable copy of the test models at `folder`, with "thinker": SmolLM2 with
    THINK_TEMPLATE and a `thinking_budget` PARAMETER of BUDGET."""
    home = writable_home(models_home, folder / "home")
    registry = Registry.open(Settings(home=home))
    registry.copy("smollm2:135m", "thinker", Overrides(parameters={"thinking_budget": BUDGET},
                                                      template_override=THINK_TEMPLATE))
    registry.close()
    return home


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    home = thinker_home(models_home, tmp_path_factory.mktemp("thinking"))
    registry = Registry.open(Settings(home=home))
    registry.copy("smollm2:135m", "thinker-plain", Overrides(template_override=THINK_TEMPLATE))  # no PARAMETER
    registry.close()
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024, thinking_budget=DAEMON_BUDGET)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


def test_a_thinking_template_is_the_thinking_capability(client: ollama.Client) -> None:
    assert "thinking" in (client.show("thinker").capabilities or [])
    assert "thinking" not in (client.show("smollm2:135m").capabilities or [])


def test_ollama_chat_thinking_apart_streamed_and_not(client: ollama.Client) -> None:
    whole = client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY)
    thinking, content = whole.message.thinking or "", whole.message.content
    assert thinking and content, whole
    assert "<think>" not in thinking + content and "</think>" not in thinking + content
    parts = list(client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == thinking
    assert "".join(p.message.content for p in parts) == content
    first_answer = next(i for i, p in enumerate(parts) if p.message.content)
    assert all(not p.message.thinking for p in parts[first_answer:])  # thinking, then the answer
    unset = client.chat(model="thinker", messages=QUESTION, options=GREEDY)  # the model's default: it thinks
    assert (unset.message.thinking, unset.message.content) == (thinking, content)


def test_think_false_closes_the_section_before_the_model_writes(client: ollama.Client) -> None:
    off = client.chat(model="thinker", messages=QUESTION, think=False, options=GREEDY)
    assert not off.message.thinking and off.message.content
    on = client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY)
    assert off.message.content != on.message.content


def test_the_budget_closes_the_thinking_at_n_tokens(client: ollama.Client) -> None:
    """The model's PARAMETER, then a request's own option: the thinking stops at the budget
    (the engine's closing marker and blank line follow, then the answer)."""
    short = client.chat(model="thinker", messages=QUESTION, think=True, options={**GREEDY, "thinking_budget": 2})
    default = client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY)
    assert short.message.thinking and default.message.thinking
    assert default.message.thinking.startswith(short.message.thinking)
    assert len(short.message.thinking) < len(default.message.thinking)


def test_ollama_generate_thinking(client: ollama.Client) -> None:
    whole = client.generate(model="thinker", prompt="What is two and two?", think=True, options=GREEDY)
    assert whole.thinking and whole.response and "</think>" not in whole.response
    parts = list(client.generate(model="thinker", prompt="What is two and two?", think=True, options=GREEDY, stream=True))
    assert "".join(p.thinking or "" for p in parts) == whole.thinking
    assert "".join(p.response for p in parts) == whole.response


@pytest.fixture(scope="module")
def openai_client(urls: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="none")


def test_openai_chat_reasoning_content_streamed_and_not(openai_client: openai.OpenAI) -> None:
    """As llama-server, vLLM and DeepSeek send it: `reasoning_content` on the message and on
    the deltas, the answer clean in `content`, the thinking's tokens in `reasoning_tokens`."""
    whole = openai_client.chat.completions.create(model="thinker", messages=QUESTION, temperature=0, max_tokens=40,
                                                  reasoning_effort="low")
    message = whole.choices[0].message
    thinking = getattr(message, "reasoning_content", None)
    assert thinking and message.content and "</think>" not in thinking + message.content
    assert whole.usage and whole.usage.completion_tokens_details
    assert 0 < (whole.usage.completion_tokens_details.reasoning_tokens or 0) < whole.usage.completion_tokens
    chunks = list(openai_client.chat.completions.create(model="thinker", messages=QUESTION, temperature=0, max_tokens=40,
                                                        reasoning_effort="low", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == message.content


@pytest.mark.parametrize("off", [{"reasoning_effort": "none"}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}])
def test_openai_chat_thinking_off(openai_client: openai.OpenAI, off: dict[str, Any]) -> None:
    whole = openai_client.chat.completions.create(model="thinker", messages=QUESTION, temperature=0, max_tokens=40, **off)
    assert getattr(whole.choices[0].message, "reasoning_content", None) is None and whole.choices[0].message.content
    assert whole.usage and whole.usage.completion_tokens_details
    assert whole.usage.completion_tokens_details.reasoning_tokens == 0


def test_openai_chat_thinking_on_a_model_that_cannot(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="smollm2:135m", messages=QUESTION, max_tokens=4, reasoning_effort="high")
    assert info.value.body and info.value.body.get("param") == "reasoning_effort"  # type: ignore[union-attr]
    plain = openai_client.chat.completions.create(model="smollm2:135m", messages=QUESTION, max_tokens=4,
                                                  reasoning_effort="none")  # asking it not to think is fine
    assert plain.choices[0].message.content is not None


SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def test_a_json_schema_holds_on_the_answer_while_the_thinking_is_free(client: ollama.Client) -> None:
    """The format's grammar starts after the reasoning section: the thinking is what the model
    thinks without any format (greedy, the same prompt), and the answer is the schema's JSON."""
    free = client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY)
    shaped = client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY, format=SCHEMA)
    assert shaped.message.thinking == free.message.thinking
    assert isinstance(json.loads(shaped.message.content)["answer"], int)


def test_a_required_tool_call_holds_on_the_answer(openai_client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                                "parameters": {"type": "object", "properties": {
                                                    "a": {"type": "integer"}, "b": {"type": "integer"}},
                                                    "required": ["a", "b"]}}}]
    r = openai_client.chat.completions.create(model="thinker", messages=QUESTION, temperature=0, max_tokens=60,
                                              tools=tools, tool_choice="required")  # type: ignore[arg-type]
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None)
    assert message.tool_calls and message.tool_calls[0].function.name == "add"
    assert set(json.loads(message.tool_calls[0].function.arguments)) == {"a", "b"}


def test_native_chat_thinking_and_sessions_keep_it_apart(urls: tuple[str, str]) -> None:
    """The native API: `think` and `thinking_budget`, the answer's `thinking`, streamed as
    `thinking` events; a session stores each answer's thinking apart and leaves it out of the
    next turn's prompt (the template would otherwise see it as the answer)."""
    main = urls[0]
    body = {"model": "thinker", "messages": QUESTION, "think": True, "options": {"temperature": 0, "max_tokens": 40}}
    first = httpx.post(f"{main}/api/chat", json=body, timeout=120).json()
    thinking, answer, session = first["message"]["thinking"], first["message"]["content"], first["session_id"]
    assert thinking and answer and "</think>" not in thinking + answer
    with httpx.stream("POST", f"{main}/api/chat", json={**body, "stream": True}, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e.get("thinking", "") for e in events if not e["done"]) == thinking
    assert "".join(e.get("token", "") for e in events) == answer and events[-1]["thinking"] == thinking
    again = {**body, "session_id": session, "messages": [{"role": "user", "content": "And three and three?"}]}
    second = httpx.post(f"{main}/api/chat", json=again, timeout=120).json()
    stored = httpx.get(f"{main}/api/sessions/{session}", timeout=30).json()["messages"]
    assert [(m["role"], m["thinking"]) for m in stored] == [
        ("user", None), ("assistant", thinking), ("user", None), ("assistant", second["message"].get("thinking"))]
    assert stored[1]["content"] == answer
    # The same conversation sent whole, the earlier answer without its thinking: the same prompt.
    whole = {**body, "messages": [*QUESTION, {"role": "assistant", "content": answer, "thinking": thinking},
                                  {"role": "user", "content": "And three and three?"}]}
    resent = httpx.post(f"{main}/api/chat", json=whole, timeout=120).json()
    assert resent["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
    assert resent["message"] == second["message"]


def test_native_generate_thinking(urls: tuple[str, str]) -> None:
    body = {"model": "thinker", "prompt": "What is two and two?", "think": True,
            "options": {"temperature": 0, "max_tokens": 40, "thinking_budget": 3}}
    r = httpx.post(f"{urls[0]}/api/generate", json=body, timeout=120).json()
    assert r["thinking"] and r["text"] and "</think>" not in r["thinking"] + r["text"]
    off = httpx.post(f"{urls[0]}/api/generate", json={**body, "think": False}, timeout=120).json()
    assert "thinking" not in off and off["text"]


def test_the_daemon_default_budget_comes_last(client: ollama.Client) -> None:
    """MYLLM_THINKING_BUDGET for a model without its own PARAMETER; a request's option wins."""
    default = client.chat(model="thinker-plain", messages=QUESTION, think=True, options=GREEDY)
    asked = client.chat(model="thinker-plain", messages=QUESTION, think=True, options={**GREEDY, "thinking_budget": BUDGET})
    own = client.chat(model="thinker", messages=QUESTION, think=True, options=GREEDY)
    assert default.message.thinking and asked.message.thinking == own.message.thinking
    assert len(default.message.thinking) < len(asked.message.thinking)
    assert asked.message.thinking.startswith(default.message.thinking)


def test_langchain_chat_ollama_reasoning(urls: tuple[str, str]) -> None:
    """LangChain's ChatOllama with `reasoning=True` puts the thinking in the message's
    `reasoning_content`, apart from the answer, streamed and not."""
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="thinker", base_url=urls[1], temperature=0, num_predict=40, reasoning=True)
    message = llm.invoke("What is two and two?")
    thinking = message.additional_kwargs.get("reasoning_content")
    assert thinking and message.content and "</think>" not in thinking + str(message.content)
    chunks = list(llm.stream("What is two and two?"))
    assert "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks) == thinking
    assert "".join(str(c.content) for c in chunks) == message.content


def test_native_thinking_capability_and_refusal(urls: tuple[str, str]) -> None:
    main = urls[0]
    listed = {m["name"]: m["thinking"] for m in httpx.get(f"{main}/api/models", timeout=30).json()["models"]}
    assert listed["thinker:latest"] is True and listed["smollm2:135m"] is False
    assert httpx.get(f"{main}/api/models/thinker", timeout=30).json()["thinking"] is True
    for route, body in (("chat", {"messages": QUESTION}), ("generate", {"prompt": "Hi"})):
        r = httpx.post(f"{main}/api/{route}", json={"model": "smollm2:135m", "think": True, **body}, timeout=60)
        assert r.status_code == 400 and "does not support thinking" in r.json()["detail"], r.text
        plain = httpx.post(f"{main}/api/{route}", timeout=60,
                           json={"model": "smollm2:135m", "think": False, "options": {"max_tokens": 2}, **body})
        assert plain.status_code == 200, plain.text
