"""The native MyLLM API through a real uvicorn on a loopback port, with the real test models."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient

from myllm.api.app import create_app

GREEDY = {"temperature": 0, "max_tokens": 12}


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_root_and_health(server: str) -> None:
    body = httpx.get(f"{server}/").json()
    count = len(httpx.get(f"{server}/api/models").json()["models"])
    assert count >= 2
    ollama_port = body.pop("ollama_port")  # extension: where Ollama's API is served
    assert body == {"name": "MyLLM", "version": "0.1.0", "status": "running", "models_available": count}
    assert httpx.get(f"http://127.0.0.1:{ollama_port}/").text == "Ollama is running"
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "healthy" and "timestamp" in health.json()


def test_health_is_503_while_starting() -> None:
    client = TestClient(create_app(), base_url="http://localhost")  # no `with`: the lifespan has not run, as during start-up
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "starting"


def test_models(server: str) -> None:
    models = {m["name"]: m for m in httpx.get(f"{server}/api/models").json()["models"]}
    smol = models["smollm2:135m"]
    extensions = {key: smol.pop(key) for key in ("digest", "size", "modified_at", "thinking", "vision", "kind")}
    assert extensions["thinking"] is False and extensions["vision"] is False and extensions["kind"] == "chat"
    assert smol == {
        "name": "smollm2:135m", "family": "llama", "size_mb": 94, "quantization": "Q4_1",
        "context_size": 8192, "template": "chatml", "parameters": {}, "loaded": False, "status": "ok", "problem": None,
    }
    assert len(extensions["digest"]) == 64 and round(extensions["size"] / (1 << 20)) == 94
    assert models["gemma3:270m"]["template"] == "gemma"
    assert models["gemma3:270m"]["context_size"] == 32768
    one = httpx.get(f"{server}/api/models/gemma3:270m").json()
    assert one["quantization"] == "Q4_K_M"
    assert one["architecture"] == "gemma3" and one["chat_template"] is None  # what `myllm show` prints: no template in the file
    assert "<|im_start|>" in httpx.get(f"{server}/api/models/smollm2:135m").json()["chat_template"]
    missing = httpx.get(f"{server}/api/models/nope:1")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "model 'nope:1' not found"}


def test_load_and_unload(server: str) -> None:
    r = httpx.post(f"{server}/api/models/smollm2:135m/load", timeout=60)
    assert r.json() == {"status": "success", "message": "Model 'smollm2:135m' loaded"}
    assert httpx.get(f"{server}/api/models/smollm2:135m").json()["loaded"] is True
    r = httpx.post(f"{server}/api/models/smollm2:135m/unload")
    assert r.json() == {"status": "success", "message": "Model 'smollm2:135m' unloaded"}
    assert httpx.get(f"{server}/api/models/smollm2:135m").json()["loaded"] is False
    assert httpx.post(f"{server}/api/models/nope:1/load").status_code == 404


def test_chat_non_streaming_starts_a_session(server: str) -> None:
    r = httpx.post(f"{server}/api/chat", json={
        "model": "smollm2:135m", "messages": [{"role": "user", "content": "Hello!"}], "options": GREEDY,
    }, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"]["role"] == "assistant" and body["message"]["content"]
    uuid.UUID(body["session_id"])
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 12

    stored = httpx.get(f"{server}/api/sessions/{body['session_id']}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][0]["tokens"] > 0
    assert stored["messages"][1]["tokens"] == usage["completion_tokens"]
    assert stored["model"] == "smollm2:135m" and stored["message_count"] == 2


def test_chat_session_history_is_used_and_kept(server: str) -> None:
    sid = f"test-{uuid.uuid4()}"
    first = httpx.post(f"{server}/api/chat", json={
        "messages": [{"role": "user", "content": "My name is Zorblax."}], "session_id": sid, "options": GREEDY,
    }, timeout=60).json()
    assert first["session_id"] == sid, "an unknown id starts a session with that id"
    second = httpx.post(f"{server}/api/chat", json={
        "messages": [{"role": "user", "content": "What is my name?"}], "session_id": sid, "options": GREEDY,
    }, timeout=60).json()
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 5, "history came first"
    detail = httpx.get(f"{server}/api/sessions/{sid}").json()
    assert [m["content"] for m in detail["messages"]][::2] == ["My name is Zorblax.", "What is my name?"]
    listed = {s["id"]: s for s in httpx.get(f"{server}/api/sessions").json()["sessions"]}
    assert listed[sid]["message_count"] == 4
    assert httpx.delete(f"{server}/api/sessions/{sid}").json()["status"] == "success"
    assert httpx.get(f"{server}/api/sessions/{sid}").status_code == 404
    assert httpx.delete(f"{server}/api/sessions/{sid}").json() == {"detail": f"session '{sid}' not found"}


def test_chat_streaming(server: str) -> None:
    with httpx.stream("POST", f"{server}/api/chat", json={
        "model": "smollm2:135m", "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "stream": True, "options": {"temperature": 0, "max_tokens": 40},
    }, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    pieces = [e for e in events if not e["done"]]
    last = events[-1]
    assert len(pieces) > 5
    assert all(set(e) == {"token", "done"} for e in pieces)
    assert last["done"] is True and uuid.UUID(last["session_id"])
    assert last["full_text"] == "".join(e["token"] for e in pieces)
    assert last["usage"]["completion_tokens"] == 40


def test_first_event_arrives_before_generation_ends(server: str) -> None:
    """Timed once the model is loaded: a load (with its CPU attention measurement) is not what
    this checks."""
    assert httpx.post(f"{server}/api/models/gemma3:270m/load", timeout=60).status_code == 200
    started = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{server}/api/chat", json={
        "model": "gemma3:270m", "messages": [{"role": "user", "content": "Write a long story."}],
        "stream": True, "options": {"temperature": 0.7, "seed": 5, "max_tokens": 120},
    }, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) > 20
    print(f"first event after {arrivals[0]:.2f}s, last after {arrivals[-1]:.2f}s")
    assert arrivals[0] < arrivals[-1] / 2, "events are flushed as tokens are generated"


def test_error_after_stream_started_is_an_event(server: str) -> None:
    with httpx.stream("POST", f"{server}/api/chat", json={
        "model": "gemma3:270m", "messages": [{"role": "user", "content": "Count to a thousand."}],
        "stream": True, "options": {"temperature": 0, "max_tokens": 2000},  # greedy: 2,000 tokens every run
    }, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["done"] is False
        httpx.post(f"{server}/api/models/gemma3:270m/unload", timeout=30)
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert rest[-1]["done"] is True
    assert "unloaded" in rest[-1]["error"]


def test_generate(server: str) -> None:
    r = httpx.post(f"{server}/api/generate", json={
        "model": "gemma3:270m", "prompt": "Once upon a time", "stream": False, "options": {"temperature": 0.8, "max_tokens": 10},
    }, timeout=60)
    body = r.json()
    assert set(body) == {"text", "usage"}
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 10
    with httpx.stream("POST", f"{server}/api/generate", json={
        "model": "gemma3:270m", "prompt": "Once upon a time", "stream": True, "options": {"max_tokens": 10},
    }, timeout=60) as streamed:
        events = sse_events(streamed)
    assert events[-1]["done"] and events[-1]["full_text"] == "".join(e["token"] for e in events[:-1])


def test_generate_session_keeps_pairs(server: str) -> None:
    sid = f"gen-{uuid.uuid4()}"
    a = httpx.post(f"{server}/api/generate", json={"model": "gemma3:270m", "prompt": "One, two,", "session_id": sid,
                                                   "options": {"temperature": 0, "max_tokens": 4}}, timeout=60).json()
    b = httpx.post(f"{server}/api/generate", json={"model": "gemma3:270m", "prompt": " five,", "session_id": sid,
                                                   "options": {"temperature": 0, "max_tokens": 4}}, timeout=60).json()
    assert a["session_id"] == b["session_id"] == sid
    assert b["usage"]["prompt_tokens"] > a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]
    detail = httpx.get(f"{server}/api/sessions/{sid}").json()
    assert detail["kind"] == "generate" and detail["message_count"] == 4


def test_embeddings(server: str) -> None:
    one = httpx.post(f"{server}/api/embeddings", json={"model": "smollm2:135m", "input": "Hello world"}, timeout=60).json()
    assert set(one) == {"embedding", "model"} and len(one["embedding"]) == 576
    many = httpx.post(f"{server}/api/embeddings", json={"model": "smollm2:135m", "input": ["a", "b"]}, timeout=60).json()
    assert set(many) == {"embeddings", "model"} and len(many["embeddings"]) == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"temperature": 5}}, 400, "temperature"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"top_p": 2}}, 400, "top_p"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"max_tokens": 0}}, 400, "max_tokens"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"tempreature": 1}}, 400, "tempreature"),
        ("/api/chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ("/api/chat", {"messages": []}, 400, "messages"),
        ("/api/chat", {"messages": "hello"}, 400, "messages"),
        ("/api/chat", {"model": "nope:1", "messages": [{"role": "user", "content": "hi"}]}, 404, "not found"),
        ("/api/chat", {"model": "../etc", "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid model name"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "session_id": "bad id!"}, 400, "session_id"),
        ("/api/generate", {"model": "smollm2:135m", "prompt": "word " * 600, "options": {"num_ctx": 256}}, 400, "256"),
        ("/api/generate", {"prompt": 42}, 400, "prompt"),
        ("/api/embeddings", {"input": []}, 400, "input"),
    ],
)
def test_errors_in_document_shape(server: str, path: str, body: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail"} and isinstance(r.json()["detail"], str)
    assert needle in r.json()["detail"]


def test_malformed_json_is_400(server: str) -> None:
    r = httpx.post(f"{server}/api/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["detail"]


def test_prompt_too_long_names_both_numbers(server: str) -> None:
    r = httpx.post(f"{server}/api/generate", json={"model": "smollm2:135m", "prompt": "word " * 600, "options": {"num_ctx": 256}},
                   timeout=60)  # loads another instance: seconds on a busy machine
    detail = r.json()["detail"]
    assert r.status_code == 400 and "256" in detail and "tokens" in detail


def test_cors_allows_local_origins(server: str) -> None:
    r = httpx.options(f"{server}/api/chat", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = httpx.options(f"{server}/api/chat", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_openapi_lists_every_route(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json").json()
    for path in ("/", "/health", "/api/models", "/api/models/{model_name}", "/api/models/{model_name}/load",
                 "/api/models/{model_name}/unload", "/api/chat", "/api/generate", "/api/embeddings",
                 "/api/sessions", "/api/sessions/{session_id}"):
        assert path in spec["paths"], path
    chat = spec["paths"]["/api/chat"]["post"]
    assert "requestBody" in chat and "200" in chat["responses"]
    assert httpx.get(f"{server}/docs").status_code == 200
    assert httpx.get(f"{server}/redoc").status_code == 200


def test_sessions_survive_a_restart(api_settings) -> None:  # type: ignore[no-untyped-def]
    from tests.server import running_server

    sid = f"restart-{uuid.uuid4()}"
    with running_server(api_settings) as url:
        httpx.post(f"{url}/api/chat", json={"model": "smollm2:135m", "session_id": sid, "options": GREEDY,
                                            "messages": [{"role": "user", "content": "Remember: blue."}]}, timeout=60)
    with running_server(api_settings) as url:
        detail = httpx.get(f"{url}/api/sessions/{sid}").json()
    assert detail["messages"][0]["content"] == "Remember: blue."
    assert len(detail["messages"]) == 2


def test_long_history_drops_oldest_turns_from_prompt_only(server: str) -> None:
    sid = f"long-{uuid.uuid4()}"
    opts = {"temperature": 0, "max_tokens": 8, "num_ctx": 256}
    system = {"role": "system", "content": "You are terse."}
    for i in range(6):
        r = httpx.post(f"{server}/api/chat", json={
            "model": "smollm2:135m", "session_id": sid, "options": opts,
            "messages": ([system] if i == 0 else []) + [{"role": "user", "content": f"Fact {i}: " + "lorem ipsum " * 20}],
        }, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] + 8 <= 256
    detail = httpx.get(f"{server}/api/sessions/{sid}").json()
    assert detail["message_count"] == 13, "system + 6 turns: the stored history stays whole"
    assert detail["messages"][0]["role"] == "system"


@pytest.mark.parametrize("fresh", [True, False], ids=["new-session", "existing-session"])
def test_concurrent_turns_on_one_session_are_serialised(server: str, fresh: bool) -> None:
    """Four turns sent at once on one session id (two of them streamed): each waits for the
    turn before it to be stored, so none is lost (a new id used to fail one with a UNIQUE
    constraint error) and the history alternates user, assistant (it used to read user, user,
    assistant, assistant with sequence numbers stored twice)."""
    import asyncio

    sid = f"race-{uuid.uuid4().hex[:8]}"
    if not fresh:
        first = httpx.post(f"{server}/api/chat", json={"model": "smollm2:135m", "session_id": sid, "stream": False,
                                                        "options": {"max_tokens": 3},
                                                        "messages": [{"role": "user", "content": "Hello"}]}, timeout=60)
        assert first.status_code == 200

    async def turn(i: int, http: httpx.AsyncClient) -> int:
        body = {"model": "smollm2:135m", "session_id": sid, "stream": i % 2 == 1, "options": {"max_tokens": 4},
                "messages": [{"role": "user", "content": f"Message {i}"}]}
        r = await http.post("/api/chat", json=body)
        if body["stream"]:
            assert '"done": true' in r.text.replace('"done":true', '"done": true') and '"error"' not in r.text, r.text
        return r.status_code

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return await asyncio.gather(*(turn(i, http) for i in range(4)))

    assert asyncio.run(run()) == [200] * 4
    messages = httpx.get(f"{server}/api/sessions/{sid}", timeout=30).json()["messages"]
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (4 if fresh else 5), roles
    sent = sorted(m["content"] for m in messages if m["role"] == "user" and m["content"].startswith("Message"))
    assert sent == [f"Message {i}" for i in range(4)], "every turn was stored, once"


def test_replica_and_session_headers(server: str) -> None:
    """For a balancer: every answer names its replica; a session turn names its session, and a
    request may name its session in the header instead of the body."""
    first = httpx.post(f"{server}/api/chat", json={"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}],
                                                   "options": GREEDY}, timeout=60)
    session = first.json()["session_id"]
    assert first.headers["x-myllm-session"] == session and first.headers["x-myllm-replica"]
    assert httpx.get(f"{server}/api/models").headers["x-myllm-replica"] == first.headers["x-myllm-replica"]
    second = httpx.post(f"{server}/api/chat", headers={"X-MyLLM-Session": session}, timeout=60,
                        json={"model": "smollm2:135m", "messages": [{"role": "user", "content": "Again"}], "options": GREEDY})
    assert second.json()["session_id"] == session and second.headers["x-myllm-session"] == session
    stored = httpx.get(f"{server}/api/sessions/{session}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    with httpx.stream("POST", f"{server}/api/chat", headers={"X-MyLLM-Session": session}, timeout=60,
                      json={"model": "smollm2:135m", "stream": True, "messages": [{"role": "user", "content": "More"}],
                            "options": GREEDY}) as streamed:
        assert streamed.headers["x-myllm-session"] == session
        streamed.read()
