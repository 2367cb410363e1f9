"""Hostile and malformed input: each gets a clear 4xx in the route's own shape, never a 500,
never a hang."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from myllm.settings import Settings
from tests.server import running_server

SHAPES = {  # a route of each API and the keys its errors carry
    "/api/chat": {"detail"},
    "/api/generate": {"detail"},
    "/v1/chat/completions": {"error"},
    "/v1/completions": {"error"},
    "/v1/embeddings": {"error"},
    "/generate": {"status", "message", "detail", "error_code"},
    "/llama": {"error"},
}


@pytest.fixture(scope="module")
def small_server(models_home) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with running_server(Settings(home=models_home, num_threads=2, num_ctx=512, max_body=64 * 1024)) as url:
        yield url


OTHER_SHAPES = {"/load_model": SHAPES["/generate"]}
"""Routes checked by some tests only (an empty `/load_model` body is valid: the default model)."""


def check(r: httpx.Response, path: str, status: int | tuple[int, ...] = 400) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {**SHAPES, **OTHER_SHAPES}[path], body
    return body


@pytest.mark.parametrize("path", list(SHAPES))
def test_body_over_limit_is_413(small_server: str, path: str) -> None:
    big = b'{"prompt": "' + b"a" * (70 * 1024) + b'"}'
    check(httpx.post(f"{small_server}{path}", content=big, headers={"content-type": "application/json"}, timeout=30), path, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"a" * 1024
        yield b'"}'

    check(httpx.post(f"{small_server}{path}", content=chunks(), headers={"content-type": "application/json"}, timeout=30), path, 413)


@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize("content", [
    b"[" * 20000 + b"]" * 20000,  # deeply nested
    b'{"prompt": "\xff\xfe\xfa", "messages": [{"role": "user", "content": "\xff"}]}',  # invalid UTF-8
    b"\x00\x00\x00",
    b"",
    b"null",
    b'"just a string"',
])
def test_malformed_bodies(small_server: str, path: str, content: bytes) -> None:
    r = httpx.post(f"{small_server}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    check(r, path, (400, 422))


@pytest.mark.parametrize("path", list(SHAPES))
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None, "text/plain"])
def test_json_without_its_content_type_says_so(small_server: str, path: str, content_type: str | None) -> None:
    """`curl -d '{...}'` sends form data's type: the error names the header to send, in the
    route's own shape (the body is still not read as JSON, which keeps pages from posting here
    without a CORS preflight)."""
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"model": "smollm2:135m", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}'
    r = httpx.post(f"{small_server}{path}", content=body, headers=headers, timeout=30)
    error = check(r, path, (400, 422))
    assert "Content-Type: application/json" in json.dumps(error), error
    assert f"(got {content_type or 'no Content-Type'})" in json.dumps(error), error


NATIVE_CASES = [
    ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "NUL"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"max_tokens": 10**12}}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"temperature": -1}}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"top_k": -5}}, "top_k"),
    ({"messages": [{"role": "hacker", "content": "hi"}]}, "role"),
    ({"messages": []}, "messages"),
    ({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, "invalid model name"),
    ({"model": "a/b", "messages": [{"role": "user", "content": "hi"}]}, "invalid model name"),
    ({"messages": [{"role": "user", "content": "hi"}], "options": {"stop": ["x"] * 100}}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "keep_alive": "forever-ish"}, "keep_alive"),
    ({"messages": [{"role": "user", "content": "hi"}], "keep_alive": "nan"}, "keep_alive"),
    ({"messages": [{"role": "user", "content": "hi"}], "keep_alive": "inf"}, "keep_alive"),
]


@pytest.mark.parametrize(("body", "needle"), NATIVE_CASES)
def test_native_hostile_values(small_server: str, body: dict, needle: str) -> None:
    detail = check(httpx.post(f"{small_server}/api/chat", json={"model": "smollm2:135m", **body}, timeout=30), "/api/chat")["detail"]
    assert needle in detail


@pytest.mark.parametrize("raw", [b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": NaN}}',
                                 b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "options": {"top_p": Infinity}}'])
def test_nan_and_infinity(small_server: str, raw: bytes) -> None:
    check(httpx.post(f"{small_server}/api/chat", content=raw, headers={"content-type": "application/json"}, timeout=30), "/api/chat")


@pytest.mark.parametrize(("path", "raw", "field"), [
    ("/api/chat", b'{"model": "smollm2:135m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    ("/api/generate", b'{"model": "smollm2:135m", "prompt": "\\udfff"}', "prompt"),
    ("/api/generate", b'{"model": "smollm2:135m", "prompt": "hi", "system": "\\ud800"}', "system"),
    ("/v1/completions", b'{"model": "smollm2:135m", "prompt": "x\\ud800"}', "prompt"),
    ("/v1/embeddings", b'{"model": "smollm2:135m", "input": ["ok", "\\ud800"]}', "input[1]"),
    ("/load_model", b'{"model_name": "\\ud800"}', "model_name"),  # checked where the body enters: named as sent
])
def test_lone_surrogates_are_a_400_naming_the_field(small_server: str, path: str, raw: bytes, field: str) -> None:
    """JSON can carry a lone surrogate as an escape; it is no text, and it used to be a 500."""
    body = check(httpx.post(f"{small_server}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30), path)
    said = json.dumps(body)
    assert field in said and ("surrogate" in said or "not printable" in said), said
    assert httpx.get(f"{small_server}/api/ps", timeout=30).status_code == 200


@pytest.mark.parametrize("body", [
    {"model": "smollm2:135m", "messages": [{"role": "user", "content": "a\u0000b"}]},
    {"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12},
    {"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "temperature": float("-1")},
    {"model": "../x", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "smollm2:135m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
])
def test_openai_hostile_values(small_server: str, body: dict) -> None:
    check(httpx.post(f"{small_server}/v1/chat/completions", json=body, timeout=30), "/v1/chat/completions")


@pytest.mark.parametrize("body", [{"prompt": "a\u0000b", "max_tokens": 1}, {"prompt": "x", "max_length": 10**12},
                                  {"prompt": "x", "temperature": -0.5}, {"prompt": "x", "model": "../../x"}])
def test_legacy_hostile_values(small_server: str, body: dict) -> None:
    check(httpx.post(f"{small_server}/generate", json=body, timeout=30), "/generate", (400, 404, 422))


HI = [{"role": "user", "content": "hi"}]
OPTION_CASES = [  # beyond the cases above and each API's own tests: a misspelt or out-of-range option, per API
    ("/api/chat", {"messages": HI, "options": {"temprature": 0.5}}, "temprature"),
    ("/api/chat", {"messages": HI, "options": {"min_p": 1.5}}, "min_p"),
    ("/v1/chat/completions", {"messages": HI, "top_k": -1}, "top_k"),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "wat"}}}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),  # the protocol's limit, not the core's 50
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 3}, "frequency_penalty"),
    ("/generate", {"prompt": "x", "max_tokens": 1, "top_p": 1.5}, "top_p"),
]


@pytest.mark.parametrize(("path", "body", "field"), OPTION_CASES)
def test_option_errors_name_the_field(small_server: str, path: str, body: dict, field: str) -> None:
    error = check(httpx.post(f"{small_server}{path}", json={"model": "smollm2:135m", **body}, timeout=30), path, (400, 422))
    if path.startswith("/v1/"):
        assert error["error"]["param"] == field and error["error"]["type"] == "invalid_request_error", error
    else:
        assert field in error["detail"], error


@pytest.mark.parametrize("url", ["/api/models/..%2F..%2Fetc%2Fpasswd", "/api/models/a%2Fb", "/api/models/..",
                                 "/v1/models/../../etc/passwd", "/v1/models/a/b", "/api/sessions/..%2Fx"])
def test_path_names(small_server: str, url: str) -> None:
    r = httpx.get(f"{small_server}{url}", timeout=30)
    assert r.status_code in (400, 404), r.text
    assert r.json()


def test_still_healthy_afterwards(small_server: str) -> None:
    r = httpx.post(f"{small_server}/api/chat", json={"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}],
                                                     "options": {"max_tokens": 3}}, timeout=60)
    assert r.status_code == 200 and httpx.get(f"{small_server}/health").status_code == 200
