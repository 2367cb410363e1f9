"""Clients in the wild (issue 28): litellm's `ollama_chat/` and `ollama/` providers, pydantic-ai's
`OllamaProvider`, dspy's `ollama_chat/` and the official `ollama` client's structured output, each
used as its README shows against one real daemon's Ollama port, on the test models.

Nothing here may reach the internet or write into the user's home: litellm reads its bundled cost
map (it fetches one on import otherwise), and dspy's disk cache lives under the test's tmp dir and
is switched off."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import ollama
import pytest
from pydantic import BaseModel, Field

from myllm.settings import Settings
from tests.server import running_servers

if TYPE_CHECKING:
    from pydantic_ai.models.openai import OpenAIChatModel

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # read at litellm's import (dspy imports it too)

MODEL = "smollm2:135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# A shape a 135M model would not write unasked: the enum and the length bound only hold when the
# schema reached the grammar. (No docstring: pydantic-ai would send it as the tool's description,
# and the requests below are those of a model without one.)
class Capital(BaseModel):
    country: Literal["France", "Germany", "Italy"]
    city: str = Field(max_length=24)


@pytest.fixture(scope="module")
def ollama_url(models_home: Path) -> Iterator[str]:
    """The Ollama listener of one daemon over the shared test models."""
    with running_servers(Settings(home=models_home, num_threads=1, num_ctx=2048)) as (_, url):
        yield url


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    import litellm

    assert litellm.cache is None  # nothing cached on disk
    return litellm


@pytest.fixture(scope="module")
def dspy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """dspy with its caches off; its cache directory (read once, at import) under tmp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSPY_CACHEDIR", str(tmp_path_factory.mktemp("dspy-cache")))
        import dspy

        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        yield dspy


@pytest.mark.parametrize("provider", ["ollama_chat", "ollama"])
def test_litellm_ollama_providers(litellm: ModuleType, ollama_url: str, provider: str) -> None:
    """litellm's two Ollama providers (`/api/chat` and `/api/generate`, bodies sent without a
    Content-Type): a completion, the same one streamed, and a JSON schema as `response_format`."""
    model = f"{provider}/{MODEL}"
    whole = litellm.completion(model=model, messages=QUESTION, api_base=ollama_url, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    chunks = list(litellm.completion(model=model, messages=QUESTION, api_base=ollama_url, max_tokens=12,
                                     temperature=0, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # greedy: the same answer
    shaped = litellm.completion(model=model, api_base=ollama_url, max_tokens=60, temperature=0, response_format=Capital,
                                messages=[{"role": "user", "content": "Which country is Paris the capital of? Answer in JSON."}])
    content = shaped.choices[0].message.content
    Capital.model_validate(json.loads(content))


def test_litellm_json_schema_dict(litellm: ModuleType, ollama_url: str) -> None:
    """OpenAI's `json_schema` response format written out as a dict, as litellm's docs show."""
    schema = {"type": "json_schema", "json_schema": {"name": "capital", "schema": Capital.model_json_schema()}}
    r = litellm.completion(model=f"ollama_chat/{MODEL}", api_base=ollama_url, max_tokens=60, temperature=0,
                           response_format=schema,
                           messages=[{"role": "user", "content": "Name a country and its capital as JSON."}])
    Capital.model_validate_json(r.choices[0].message.content)


def pydantic_ai_model(ollama_url: str) -> OpenAIChatModel:
    """pydantic-ai's Ollama setup: its OpenAI chat model on the Ollama port's `/v1`."""
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.ollama import OllamaProvider

    return OpenAIChatModel(MODEL, provider=OllamaProvider(base_url=f"{ollama_url}/v1"))


def test_pydantic_ai_agent_returns_text(ollama_url: str) -> None:
    from pydantic_ai import Agent

    agent = Agent(pydantic_ai_model(ollama_url), model_settings={"temperature": 0, "max_tokens": 24})
    result = agent.run_sync("What is the capital of France?")
    assert isinstance(result.output, str) and result.output.strip()
    assert result.usage.requests == 1 and 0 < result.usage.output_tokens <= 24


def test_pydantic_ai_structured_output_through_a_forced_tool_call(ollama_url: str) -> None:
    """pydantic-ai's default output mode offers a `final_result` tool with `tool_choice: required`
    on `/v1/chat/completions`: the forced call's arguments are the structured output, on the first
    request (a reply returned as text would make pydantic-ai ask again)."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, ToolCallPart

    agent = Agent(pydantic_ai_model(ollama_url), output_type=Capital,
                  model_settings={"temperature": 0, "max_tokens": 200})
    result = agent.run_sync("Which country is Paris the capital of?")
    assert isinstance(result.output, Capital)
    calls = [p for m in result.all_messages() if isinstance(m, ModelResponse) for p in m.parts if isinstance(p, ToolCallPart)]
    assert calls and calls[0].tool_name == "final_result"
    assert result.usage.requests == 1


def test_pydantic_ai_structured_output_cut_off_by_the_token_limit(ollama_url: str) -> None:
    """Asked for nothing in particular, a small model forced to call repeats `final_result` until
    the token limit: the complete calls come back as calls, the first is the output, and
    pydantic-ai needs no second request (issue 28: the raw call text as content made it fail)."""
    from pydantic_ai import Agent

    agent = Agent(pydantic_ai_model(ollama_url), output_type=Capital, model_settings={"temperature": 0, "max_tokens": 60})
    result = agent.run_sync("Hello")
    assert isinstance(result.output, Capital)
    assert result.usage.requests == 1


class Trip(BaseModel):
    start: Capital
    end: Capital


def test_pydantic_ai_nested_output_model(ollama_url: str) -> None:
    """A nested model's schema refers to its parts (`$ref: "#/$defs/Capital"`); the forced call's
    grammar must resolve those references where the tool's parameters are embedded."""
    from pydantic_ai import Agent

    agent = Agent(pydantic_ai_model(ollama_url), output_type=Trip, model_settings={"temperature": 0, "max_tokens": 200})
    result = agent.run_sync("Plan a trip from Paris to Rome.")
    assert isinstance(result.output, Trip) and isinstance(result.output.end, Capital)
    assert result.usage.requests == 1


def test_dspy_native_engine_on_ollamas_v1(dspy: ModuleType, ollama_url: str) -> None:
    """dspy's own engine sends `ollama_chat/` to the OpenAI-compatible API, by default at
    `http://localhost:11434/v1`; no key is needed."""
    lm = dspy.LM(f"ollama_chat/{MODEL}", api_base=f"{ollama_url}/v1", cache=False, temperature=0, max_tokens=12,
                 num_retries=0)
    outputs = lm("What is the capital of France?")
    assert len(outputs) == 1 and isinstance(outputs[0], str) and outputs[0].strip()


def test_dspy_predict_through_litellm(dspy: ModuleType, ollama_url: str) -> None:
    """dspy's documented Ollama setup (`api_base` the server, `api_key=""`) on its litellm engine
    (`/api/chat`): a `Predict` whose signature the model must fill. A 135M model does not write the
    chat adapter's `[[ ## answer ## ]]` fields; dspy then falls back to its JSON adapter, which
    asks for `format: "json"`, and the grammar makes that reply parse."""
    lm = dspy.LM(f"ollama_chat/{MODEL}", api_base=ollama_url, api_key="", engine="litellm", cache=False,
                 temperature=0, max_tokens=40, num_retries=0)
    with dspy.context(lm=lm):
        prediction = dspy.Predict("question -> answer")(question="What is the capital of France?")
    assert isinstance(prediction.answer, str) and prediction.answer
    assert [h["kwargs"].get("response_format") for h in lm.history] == [None, {"type": "json_object"}]


def test_ollama_client_format_from_a_pydantic_model(ollama_url: str) -> None:
    """The `ollama` client's README: `format=Model.model_json_schema()`, then
    `Model.model_validate_json` on the reply, whole and streamed."""
    client = ollama.Client(host=ollama_url, timeout=120)
    messages = [{"role": "user", "content": "Which country is Paris the capital of? Answer in JSON."}]
    options = {"temperature": 0, "num_predict": 60}
    whole = client.chat(model=MODEL, messages=messages, format=Capital.model_json_schema(), options=options)
    assert whole.done_reason == "stop"
    Capital.model_validate_json(whole.message.content)
    parts = list(client.chat(model=MODEL, messages=messages, format=Capital.model_json_schema(), options=options,
                             stream=True))
    assert parts[-1].done and len(parts) > 2
    streamed = "".join(p.message.content for p in parts)
    assert streamed == whole.message.content
    Capital.model_validate_json(streamed)
