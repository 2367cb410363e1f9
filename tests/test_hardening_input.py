"""Issue 27, cases 1, 2, 10 and 11: client text and counts that made the daemon spend without
bound. Each attack gets a quick 400 naming its field while a bystander (another key) keeps being
served (`still_answering`); the pure measuring logic is tested on its own below."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from myllm.errors import InvalidOptions
from myllm.runtime.request.durations import parse_duration
from myllm.runtime.request.schema_size import SchemaLimits, _Estimate, check_schema
from myllm.runtime.request.tools import Tool, parse_calls
from myllm.runtime.service import Runtime
from myllm.settings import Settings
from tests.hostile import ALICE, MODEL, Hostile, hostile_daemon, key, still_answering

EMBED_BOUND = 256
"""MYLLM_MAX_EMBED_INPUTS of the suite's daemon: small enough that a request at the bound is quick here."""


@pytest.fixture(scope="module")
def h(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    # Bodies may nest deeper than schemas here, so the 200-deep schema meets the schema's own bound
    # (the body's, MYLLM_MAX_JSON_DEPTH, is the runner cases' test).
    with hostile_daemon(models_home, tmp_path_factory.mktemp("input") / "home",
                        MYLLM_MAX_EMBED_INPUTS=str(EMBED_BOUND), MYLLM_MAX_JSON_DEPTH="512") as hostile:
        yield hostile


def oai(h: Hostile) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key=ALICE, max_retries=0, timeout=60)


def oll(h: Hostile) -> ollama.Client:
    return ollama.Client(host=h.ollama, headers=key(ALICE), timeout=60)


def refused(call: Any, exc: type[Exception], *words: str, param: str | None = None) -> None:
    """`call()` raised `exc` (the client's 400); its text holds each of `words`, and (an OpenAI
    error) its `param` is `param`."""
    with pytest.raises(exc) as info:
        call()
    text = str(info.value)
    for word in words:
        assert word in text, text[:500]
    if param is not None:
        assert info.value.body["param"] == param, info.value.body  # type: ignore[attr-defined]


# -- case 1: keep_alive of 30,000 digits and a letter -----------------------------------------------


def test_a_long_keep_alive_is_a_quick_400_on_both_ports(h: Hostile) -> None:
    """It held the event loop 20 s (a backtracking regular expression): now a length cap and one
    pass, on the main port's and Ollama's `/api/generate`."""
    long = "1" * 30_000 + "x"
    with still_answering(h):
        r = httpx.post(f"{h.url}/api/generate", headers=key(ALICE), timeout=30,
                       json={"model": MODEL, "prompt": "Hi", "keep_alive": long, "options": {"max_tokens": 1}})
        assert r.status_code == 400 and "keep_alive" in r.json()["detail"], r.text[:300]
        assert long not in r.text  # not quoted back
        client = oll(h)
        refused(lambda: client.generate(MODEL, "Hi", keep_alive=long, options={"num_predict": 1}), ollama.ResponseError,
                "keep_alive")
        refused(lambda: client.generate(MODEL, "", keep_alive=long), ollama.ResponseError, "keep_alive")  # a load
        refused(lambda: client.chat(MODEL, [{"role": "user", "content": "Hi"}], keep_alive="9" * 40_000 + "m!"),
                ollama.ResponseError, "keep_alive")


@pytest.mark.parametrize(("text", "seconds"), [("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25), (" 5M ", 300),
                                               ("-1h", -3600), ("1m1ms", 60.001), ("7", 7)])
def test_durations_read_in_one_pass(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["1" * 30_000 + "x", "1" * 65, "1²s", "1.s", "h", "5m-", "--5m", "5 m"])
def test_bad_durations_are_refused_at_once(bad: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        parse_duration(bad)
    assert info.value.field == "keep_alive" and len(info.value.message) < 200


def test_hermes_calls_are_read_in_one_pass() -> None:
    """The lazy-body regular expression took seconds on a long run of spaces (which a model can
    be made to write: at 200,000 spaces, far past pytest's timeout); the scan reads the same
    blocks."""
    tools = [Tool("f", "", {})]
    assert parse_calls("<tool_call>x" + " " * 200_000 + "y", tools)[1] == []
    content, calls = parse_calls('hi <tool_call> {"name": "f", "arguments": {"a": 1}} </tool_call> there '
                                 '<tool_call>{"name": "f"}', tools)
    assert content == "hi  there" and [(c.name, c.arguments) for c in calls] == [("f", {"a": 1}), ("f", {})]


# -- case 2: JSON schemas the converter would write out in full ----------------------------------------

HUGE_SCHEMAS = {
    "minLength": {"type": "string", "minLength": 250_000_000},
    "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 100_000_000},
    "nested": {"type": "array", "minItems": 3000, "items": {"type": "array", "minItems": 3000, "items": {"type": "integer"}}},
    "pattern": {"type": "string", "pattern": "^" + "\\." * 3000 + "{60000}$"},
    "loop": {"type": "string", "pattern": "^]$"},  # the converter never returns from this one
    "enum": {"enum": [f"value-{i}-" + "x" * 40 for i in range(20_000)]},
    "deep": json.loads('{"type": "array", "items": ' * 200 + '{"type": "integer"}' + "}" * 200),
}


def test_huge_schemas_are_a_quick_400_on_every_route(h: Hostile) -> None:
    """`response_format`, Ollama's `format` (chat and generate), the Responses API's `text.format`
    and a required tool call's parameters: each measured before conversion (which runs off the
    loop), a 400 naming where the schema came from."""
    client, olc = oai(h), oll(h)
    hi = [{"role": "user", "content": "Hi"}]
    with still_answering(h):
        for name, schema in HUGE_SCHEMAS.items():
            fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
            refused(lambda: client.chat.completions.create(model=MODEL, messages=hi, max_tokens=1, response_format=fmt),
                    openai.BadRequestError, "JSON schema", param="response_format")
            refused(lambda: olc.chat(MODEL, hi, format=schema, options={"num_predict": 1}), ollama.ResponseError, "JSON schema")
            refused(lambda: olc.generate(MODEL, "Hi", format=schema, options={"num_predict": 1}), ollama.ResponseError,
                    "JSON schema")
            refused(lambda: client.responses.create(model=MODEL, input="Hi", max_output_tokens=16, text={"format": {
                "type": "json_schema", "name": "s", "schema": schema}}), openai.BadRequestError, "JSON schema")
            tool = {"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"a": schema}, "required": ["a"]}}}
            refused(lambda: client.chat.completions.create(model=MODEL, messages=hi, max_tokens=1, tools=[tool],
                                                           tool_choice="required"), openai.BadRequestError,
                    "tools' parameters", param="tools")
    ok = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=40, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {
            "a": {"type": "string", "maxLength": 5}}, "required": ["a"]}}})
    assert len(json.loads(ok.choices[0].message.content or "")["a"]) <= 5


LIMITS = SchemaLimits(grammar=65536, depth=64, nodes=65536)


@pytest.mark.parametrize("name", list(HUGE_SCHEMAS))
def test_huge_schemas_are_refused_before_conversion(name: str) -> None:
    """Measured by numbers, never expanded: converting `minLength`, `minItems` or `loop` would
    not return (pytest's timeout would end this test). No wall-clock bound here: under load the
    20,000-value enum's walk once took just over the half second this test used to allow."""
    with pytest.raises(InvalidOptions) as info:
        check_schema(HUGE_SCHEMAS[name], LIMITS, "format")
    assert info.value.field == "format"


FAIR_SCHEMAS = [
    {"type": "string", "minLength": 10, "maxLength": 200},
    {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 300},
    {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(50)}, "required": [f"p{i}" for i in range(0, 50, 2)]},
    {"type": "object", "properties": {"mail": {"type": "string", "pattern": "^[a-z]{1,64}@[a-z]{1,255}\\.[a-z]{2,10}$"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}}},
    {"type": "string", "pattern": "^(ab|cd){300}\\.\\.\\.{100}$"},
    {"anyOf": [{"type": "string", "maxLength": 50}, {"type": "array", "items": {"type": "number"}, "maxItems": 40}]},
    {"type": "object", "properties": {"名字": {"type": "string", "maxLength": 30}, "a.b c": {"enum": list(range(200))}}},
    {"type": "object", "properties": {f"p{i}": {} for i in range(600)}},  # many optional properties: near the bound
]


@pytest.mark.parametrize("schema", FAIR_SCHEMAS, ids=range(len(FAIR_SCHEMAS)))
def test_the_estimate_follows_the_converter(schema: dict[str, Any]) -> None:
    """The estimate is close to the grammar's real length and not above it by more than the
    quarter the bound allows, so what passes conversion is never refused beforehand."""
    from llama_cpp import llama_grammar

    real = len(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    estimate = _Estimate(schema, LIMITS, bound=10**12)
    estimate.visit(schema, 0, 0)
    assert 0.3 * real <= estimate.total <= 1.2 * real, (estimate.total, real)
    check_schema(schema, LIMITS, "format")


# -- case 10: 60,000 messages ------------------------------------------------------------------------

MANY = 60_000


def test_too_many_messages_is_a_quick_400_on_every_chat_route(h: Hostile) -> None:
    """Every message was rendered, tokenized and stored as a row: 45-128 s, other keys stalled.
    Past MYLLM_MAX_MESSAGES (2048) every chat route answers a 400 in its own shape."""
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(MANY - 1)] + \
        [{"role": "user", "content": "Hi"}]
    with still_answering(h):
        r = httpx.post(f"{h.url}/api/chat", headers=key(ALICE), timeout=30,
                       json={"model": MODEL, "messages": many, "options": {"max_tokens": 1}})
        assert r.status_code == 400 and "MYLLM_MAX_MESSAGES" in r.json()["detail"], r.text[:300]
        refused(lambda: oll(h).chat(MODEL, many, options={"num_predict": 1}), ollama.ResponseError, "MYLLM_MAX_MESSAGES")
        refused(lambda: oai(h).chat.completions.create(model=MODEL, messages=many, max_tokens=1),  # type: ignore[arg-type]
                openai.BadRequestError, "MYLLM_MAX_MESSAGES")
        refused(lambda: oai(h).responses.create(model=MODEL, input=many, max_output_tokens=16),  # type: ignore[arg-type]
                openai.BadRequestError, "MYLLM_MAX_MESSAGES")
        claude = anthropic.Anthropic(base_url=h.url, api_key=ALICE, max_retries=0, timeout=60)
        refused(lambda: claude.messages.create(model=MODEL, max_tokens=1, messages=many),  # type: ignore[arg-type]
                anthropic.BadRequestError, "MYLLM_MAX_MESSAGES")
    r = httpx.post(f"{h.url}/api/chat", headers=key(ALICE), timeout=60,
                   json={"model": MODEL, "messages": many[-300:], "options": {"max_tokens": 1}})
    assert r.status_code == 200, r.text[:300]  # under the bound: served (trimmed to the context)


def test_too_many_prompts_in_one_completions_request_is_a_400(h: Hostile) -> None:
    """A list of prompts on `/v1/completions` is that many generations, one after another: at
    most MYLLM_MAX_QUEUE (64) of them."""
    with still_answering(h):
        refused(lambda: oai(h).completions.create(model=MODEL, prompt=["x"] * 65, max_tokens=1),
                openai.BadRequestError, "MYLLM_MAX_QUEUE", param="prompt")
    assert len(oai(h).completions.create(model=MODEL, prompt=["x"] * 2, max_tokens=1).choices) == 2


def test_a_long_stored_conversation_keeps_its_system_message_and_newest_turns() -> None:
    runtime: Any = SimpleNamespace(settings=Settings(max_messages=5))
    earlier = [{"role": "system", "content": "s"}] + [{"role": "user", "content": str(i)} for i in range(10)]
    assert Runtime.recent(runtime, earlier, 2) == [earlier[0], earlier[-2], earlier[-1]]
    assert Runtime.recent(runtime, earlier[:3], 2) == earlier[:3]
    assert Runtime.recent(runtime, earlier, 5) == []


# -- case 11: 10,000 embedding inputs ----------------------------------------------------------------


def test_too_many_embedding_inputs_is_a_400_and_a_request_at_the_bound_leaves_others_served(h: Hostile) -> None:
    """10,000 inputs took 294 s and 380 MB while other keys waited. Past MYLLM_MAX_EMBED_INPUTS
    every embedding route answers a 400; a request at the bound is embedded in slices while the
    bystander is served."""
    texts = [f"text number {i}" for i in range(10_000)]
    with still_answering(h, min_rounds=2):
        refused(lambda: oll(h).embed(MODEL, texts), ollama.ResponseError, "MYLLM_MAX_EMBED_INPUTS")
        refused(lambda: oai(h).embeddings.create(model=MODEL, input=texts), openai.BadRequestError, "MYLLM_MAX_EMBED_INPUTS")
        r = httpx.post(f"{h.url}/api/embeddings", headers=key(ALICE), json={"model": MODEL, "input": texts}, timeout=30)
        assert r.status_code == 400 and "MYLLM_MAX_EMBED_INPUTS" in r.json()["detail"], r.text[:300]
        refused(lambda: oll(h).embed(MODEL, texts[:EMBED_BOUND + 1]), ollama.ResponseError, "MYLLM_MAX_EMBED_INPUTS")
        at_bound = oll(h).embed(MODEL, texts[:EMBED_BOUND])
    assert len(at_bound.embeddings) == EMBED_BOUND and len(set(map(tuple, at_bound.embeddings[:40]))) == 40
