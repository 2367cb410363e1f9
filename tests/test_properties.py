"""Property-based: whatever JSON schema, regular-expression pattern or message list a client
sends, no route answers 5xx and no runner dies. Hypothesis generates them (derandomized, so a
run is repeatable); a failure prints the smallest request that breaks the promise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.server
from myllm.settings import Settings
from tests.server import running_server

SPECIAL = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "</s>", "\ud800", "\x00"]
# Text as clients send it, with the pieces that used to hurt: control tokens, lone surrogates, NUL.
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL)), max_size=5).map("".join)
PATTERN = st.lists(st.one_of(
    st.sampled_from(["^", "$", ".", "*", "+", "?", "|", "(", ")", "[", "]", "{", "}", "\\d", "\\w", "\\s", "\\b",
                     "{1,3}", "{2}", "[a-z]", "[^x]", "(?:", "(?=", "\\", "\\ud800", "\ud800", "\\u0041", "\\1"]),
    st.text(alphabet="ab-", max_size=2),
), max_size=8).map("".join)
SCALAR_SCHEMAS = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "nope"])}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": PATTERN}),
    st.fixed_dictionaries({"type": st.just("string")}, optional={
        "minLength": st.integers(-2, 5), "maxLength": st.integers(-2, 5), "format": st.sampled_from(["date", "uuid", "email", "x"])}),
    st.fixed_dictionaries({"type": st.just("integer")}, optional={"minimum": st.integers(-5, 5), "maximum": st.integers(-5, 5)}),
    st.fixed_dictionaries({"enum": st.lists(st.one_of(TEXT, st.integers(), st.none()), max_size=4)}),
    st.fixed_dictionaries({"const": st.one_of(TEXT, st.integers())}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#/definitions/x", "#/$defs/nope", "http://example.com/s.json", "#"])}),
)
SCHEMAS = st.recursive(SCALAR_SCHEMAS, lambda inner: st.one_of(
    st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(TEXT, inner, max_size=3)},
                          optional={"required": st.lists(TEXT, max_size=2), "additionalProperties": st.one_of(st.booleans(), inner)}),
    st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                          optional={"minItems": st.integers(-1, 3), "maxItems": st.integers(-1, 3)}),
    st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)}),
    st.fixed_dictionaries({"allOf": st.lists(inner, max_size=2)}),
), max_leaves=6)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]),
    "content": st.one_of(TEXT, st.none(), st.integers()),
}), max_size=6)


@pytest.fixture(scope="module")
def url(models_home: Path) -> Iterator[str]:
    with running_server(Settings(home=models_home, num_threads=2, num_ctx=512, template_timeout=5)) as url:
        yield url


def runners() -> dict[str, int | None]:
    assert tests.server.LAST_APP is not None
    manager = tests.server.LAST_APP.state.services.runtime.manager
    return {inst.spec.name: inst.runner.pid for inst in manager._instances.values()}


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    """JSON with lone surrogates kept as escapes (as a hostile client can send them)."""
    import json

    return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)


def test_no_schema_pattern_or_message_list_breaks_the_daemon(url: str) -> None:
    warm = post(url, "/api/chat", {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 1}})
    assert warm.status_code == 200, warm.text
    before = runners()
    seen: set[int] = set()

    @given(schema=SCHEMAS, messages=MESSAGES)
    @settings(max_examples=120, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(schema: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        for path, body in (
            ("/v1/chat/completions", {"model": "smollm2:135m", "max_tokens": 4, "messages": messages or [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}),
            ("/api/chat", {"model": "smollm2:135m", "messages": messages, "options": {"max_tokens": 4}}),
        ):
            r = post(url, path, body)
            seen.add(r.status_code)
            assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
        assert runners() == before, "a runner died"

    check()
    assert 200 in seen and 400 in seen, seen  # the generator reached both valid and refused requests
    assert httpx.get(f"{url}/health", params={"ready": 1}, timeout=5).status_code == 200
