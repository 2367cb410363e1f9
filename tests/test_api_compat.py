"""The DeepShiva, LLM-service and Llama-server routes, with each document's own examples and
every error case, against a real uvicorn with the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from myllm.pull import pull
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests.conftest import register_broken_model, smollm2_file
from tests.fakehub import FakeHub
from tests.server import running_server

BOTH_SHAPES = {"status", "message", "detail", "error_code"}


@pytest.fixture(scope="module")
def compat_home(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    home = tmp_path_factory.mktemp("compat-home")
    registry = Registry.open(Settings(home=home))
    pull(registry, Settings(home=home), str(smollm2_path), name="smollm2:135m")
    register_broken_model(registry, "broken", smollm2_path, tmp_path_factory.mktemp("broken"))
    registry.close()
    return home


@pytest.fixture(scope="module")
def compat(compat_home: Path) -> Iterator[str]:
    models = str(smollm2_file().parent)  # where /load_model may read files from
    with running_server(Settings(home=compat_home, num_threads=2, num_ctx=2048, model_dirs=models)) as url:
        yield url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


# -- DeepShiva -----------------------------------------------------------------------------


def test_deepshiva_flow(compat: str) -> None:
    status = httpx.get(f"{compat}/model_status").json()
    assert status["status"] == "success" and status["model_name"] == "smollm2:135m"
    loaded = post(compat, "/load_model", {"model_name": "smollm2:135m"})
    assert loaded.json() == {"status": "success", "message": "Model smollm2:135m loaded successfully"}
    assert httpx.get(f"{compat}/model_status").json() == {
        "status": "success", "model_loaded": True, "model_name": "smollm2:135m", "device": "cpu"}

    # The document's /generate request, unchanged.
    r = post(compat, "/generate", {"prompt": "def fibonacci(n):", "max_length": 512, "temperature": 0.7}).json()
    assert r["status"] == "success" and r["response"].startswith("def fibonacci(n):")
    assert r["response"] == "def fibonacci(n):" + r["generated_text"]


def test_deepshiva_stream(compat: str) -> None:
    with httpx.stream("POST", f"{compat}/stream", json={"prompt": "def fibonacci(n):", "max_length": 40,
                                                         "temperature": 0.7}, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [block for block in body.split("\n\n") if block.strip()]
    assert events[-1] == "event: done\ndata: [DONE]"
    pieces = ["\n".join(line[6:] for line in e.split("\n") if line.startswith("data: ")) for e in events[:-1]]
    assert len(pieces) > 5 and "".join(pieces).strip()


def test_load_model_from_path_and_hub(compat: str, smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = post(compat, "/load_model", {"model_name": str(smollm2_path)})
    assert r.status_code == 200 and r.json()["status"] == "success"
    assert httpx.get(f"{compat}/model_status").json()["model_name"] == "smollm2-135m-instruct.q4_1:latest"
    with FakeHub({"someone/tiny-GGUF": {"tiny.Q4_K_M.gguf": smollm2_path}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = post(compat, "/load_model", {"model_name": "someone/tiny-GGUF"})
    assert r.json() == {"status": "success", "message": "Model someone/tiny-GGUF loaded successfully"}
    assert httpx.get(f"{compat}/model_status").json() == {
        "status": "success", "model_loaded": True, "model_name": "tiny:latest", "device": "cpu"}


def test_load_model_default(compat: str) -> None:
    assert post(compat, "/load_model", {}).json()["message"] == "Model smollm2:135m loaded successfully"


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/load_model", {"model_name": "stabilityai/stable-code-3b"}, 404, "MODEL_NOT_FOUND"),
    ("/load_model", {"model_name": "/no/such/model.gguf"}, 403, "FORBIDDEN"),  # outside MYLLM_MODEL_DIRS
    ("/generate", {"prompt": "x", "max_length": -5}, 422, "INVALID_MAX_TOKENS"),
    ("/generate", {"prompt": "x", "temperature": 3.5}, 422, "INVALID_TEMPERATURE"),
    ("/stream", {"prompt": "x", "max_length": -1}, 422, "INVALID_MAX_TOKENS"),
])
def test_deepshiva_errors(compat: str, path: str, body: dict, status: int, code: str) -> None:
    r = post(compat, path, body)
    assert r.status_code == status, r.text
    assert set(r.json()) == BOTH_SHAPES and r.json()["status"] == "error" and r.json()["error_code"] == code


def test_no_model_loaded(tmp_path: Path) -> None:
    with running_server(Settings(home=tmp_path / "empty", num_threads=2)) as url:
        for path in ("/generate", "/stream"):
            r = post(url, path, {"prompt": "def f():"})
            assert r.status_code == 503
            assert r.json()["error_code"] == "MODEL_NOT_LOADED" and r.json()["status"] == "error"
        assert httpx.get(f"{url}/model_status").json()["model_loaded"] is False


def test_out_of_memory(compat_home: Path) -> None:
    with running_server(Settings(home=compat_home, max_memory="20MB")) as url:
        r = post(url, "/load_model", {"model_name": "smollm2:135m"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error_code"] == "OUT_OF_MEMORY" and "budget" in r.json()["message"]


# -- LLM service ----------------------------------------------------------------------------


def test_llm_service_generate_document_example(compat: str) -> None:
    r = post(compat, "/generate", {"prompt": "The capital of France is", "temperature": 1.0, "max_tokens": 1, "top_k": 5})
    body = r.json()
    assert r.status_code == 200
    assert {"status", "response", "generated_text", "tokens", "metadata"} <= set(body)
    tokens = body["tokens"]
    assert [t["rank"] for t in tokens] == [1, 2, 3, 4, 5]
    assert [t["probability"] for t in tokens] == sorted((t["probability"] for t in tokens), reverse=True)
    for t in tokens:
        assert t["percentage"] == pytest.approx(t["probability"] * 100, abs=0.01)
        assert t["logprob"] <= 0
    meta = body["metadata"]
    assert meta["model_name"] == "smollm2:135m" and meta["prompt_length"] == 24 and meta["prompt_tokens"] == 5
    assert meta["temperature_used"] == 1.0 and meta["device"] == "cpu" and meta["generation_time_ms"] >= 0
    assert len(body["positions"]) == 1


@pytest.mark.parametrize("top_k", [21, 50])
def test_llm_service_top_k_up_to_50(compat: str, top_k: int) -> None:
    """The document allows top_k 1-50; every generated position gets that many candidates."""
    r = post(compat, "/generate", {"prompt": "The capital of France is", "max_tokens": 2, "top_k": top_k})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["rank"] for t in body["tokens"]] == list(range(1, top_k + 1))
    assert body["positions"] and all(len(p["candidates"]) == top_k for p in body["positions"])
    probabilities = [t["probability"] for t in body["tokens"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001


def test_llm_service_status(compat: str) -> None:
    post(compat, "/load_model", {"model_name": "smollm2:135m"})
    s = httpx.get(f"{compat}/status").json()
    assert s["service"]["status"] == "running" and s["service"]["memory_usage_mb"] > 50
    assert s["model"] == {"name": "smollm2:135m", "loaded": True, "device": "cpu", "precision": "int4",
                          "max_length": 2048, "vocab_size": 49152}
    assert s["system"]["gpu_available"] is False and s["system"]["gpu_name"] is None
    assert s["system"]["cpu_cores"] >= 1 and s["system"]["system_memory_gb"] >= 1
    assert any(m["name"] == "smollm2:135m" for m in s["loaded_models"])


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"prompt": ""}, 400, "EMPTY_PROMPT"),
    ({"prompt": "   "}, 400, "EMPTY_PROMPT"),
    ({"prompt": "word " * 3000, "max_tokens": 1}, 400, "PROMPT_TOO_LONG"),
    ({"prompt": "x", "temperature": 2.5, "max_tokens": 1}, 422, "INVALID_TEMPERATURE"),
    ({"prompt": "x", "max_tokens": 101}, 422, "INVALID_MAX_TOKENS"),
    ({"prompt": "x", "max_tokens": 0}, 422, "INVALID_MAX_TOKENS"),
    ({"prompt": "x", "top_k": 51}, 422, "INVALID_TOP_K"),
    ({"prompt": "x", "top_k": 0}, 422, "INVALID_TOP_K"),
    ({"prompt": "x", "max_tokens": 1, "model": "broken"}, 500, "GENERATION_FAILED"),
])
def test_llm_service_errors(compat: str, body: dict, status: int, code: str) -> None:
    r = post(compat, "/generate", body)
    assert r.status_code == status, r.text
    assert set(r.json()) == BOTH_SHAPES and r.json()["error_code"] == code


PY_CLIENT = '''
import asyncio
import httpx

async def generate_tokens(prompt: str, temperature: float = 1.0):
    """Generate token probabilities using the LLM service."""
    async with httpx.AsyncClient() as client:
        response = await client.post(
            "http://localhost:8001/generate",
            json={
                "prompt": prompt,
                "temperature": temperature,
                "max_tokens": 1,
                "top_k": 5
            },
            headers={"Authorization": "Bearer YOUR_API_KEY"}  # If auth enabled
        )
        response.raise_for_status()
        return response.json()

# Usage
async def main():
    result = await generate_tokens("The capital of France is")
    
    print(f"Generated: {result['generated_text']}")
    print("Top alternatives:")
    for token in result['tokens']:
        print(f"  {token['token']}: {token['percentage']:.1f}%")

asyncio.run(main())
'''

JS_CLIENT = '''
async function generateTokens(prompt, temperature = 1.0) {
    const response = await fetch('http://localhost:8001/generate', {
        method: 'POST',
        headers: {
            'Content-Type': 'application/json',
            'Authorization': 'Bearer YOUR_API_KEY'  // If auth enabled
        },
        body: JSON.stringify({
            prompt: prompt,
            temperature: temperature,
            max_tokens: 1,
            top_k: 5
        })
    });
    
    if (!response.ok) {
        throw new Error(`HTTP error! status: ${response.status}`);
    }
    
    return await response.json();
}

// Usage
generateTokens("The capital of France is")
    .then(result => {
        console.log(`Generated: ${result.generated_text}`);
        console.log("Top alternatives:");
        result.tokens.forEach(token => {
            console.log(`  ${token.token}: ${token.percentage.toFixed(1)}%`);
        });
    })
    .catch(error => console.error('Error:', error));
'''

CURL = '''
# Basic generation
curl -X POST "http://localhost:8001/generate" \\
     -H "Content-Type: application/json" \\
     -d '{
       "prompt": "The capital of France is",
       "temperature": 1.0,
       "max_tokens": 1,
       "top_k": 5
     }'
echo
# With authentication
curl -X POST "http://localhost:8001/generate" \\
     -H "Content-Type: application/json" \\
     -H "Authorization: Bearer YOUR_API_KEY" \\
     -d '{
       "prompt": "The weather today is",
       "temperature": 0.8,
       "max_tokens": 1,
       "top_k": 10
     }'
echo
# Health check
curl -X GET "http://localhost:8001/health"
echo
# Status check
curl -X GET "http://localhost:8001/status"
'''


@pytest.fixture(scope="module")
def keyed(compat_home: Path) -> Iterator[str]:
    """The daemon with API keys on, the key being the documents' placeholder."""
    with running_server(Settings(home=compat_home, num_threads=2, num_ctx=2048, api_keys="YOUR_API_KEY,other")) as url:
        yield url


def _output_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def test_llm_service_python_client(keyed: str) -> None:
    proc = subprocess.run([sys.executable, "-c", PY_CLIENT.replace("http://localhost:8001", keyed)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = _output_lines(proc.stdout)
    assert lines[0].startswith("Generated: ") and lines[1] == "Top alternatives:" and len(lines) == 7


def test_llm_service_javascript_client(keyed: str) -> None:
    proc = subprocess.run(["node", "-e", JS_CLIENT.replace("http://localhost:8001", keyed)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    lines = _output_lines(proc.stdout)
    assert lines[0].startswith("Generated: ") and lines[1] == "Top alternatives:" and len(lines) == 7


def _run_curl(url: str) -> list[dict]:
    script = CURL.replace("http://localhost:8001", url)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in _output_lines(proc.stdout)]


def test_llm_service_curl_examples(compat: str, keyed: str) -> None:
    basic, with_auth, health, status = _run_curl(compat)
    assert len(basic["tokens"]) == 5 and len(with_auth["tokens"]) == 10
    assert health["status"] == "healthy" and {"service", "model", "system"} <= set(status)
    # With keys on, only the example that sends the key, and the health check, get through.
    basic, with_auth, health, status = _run_curl(keyed)
    assert basic["status"] == "error" and basic["error_code"] == "UNAUTHORIZED"
    assert len(with_auth["tokens"]) == 10 and health["status"] == "healthy" and status["status"] == "error"


# -- Llama server ------------------------------------------------------------------------------


def test_llama_document_example(compat: str) -> None:
    r = post(compat, "/llama", {"prompt": "What's your favorite kind of boat?", "max_length": 50, "pre_response": "Ahoy! "})
    assert r.status_code == 200
    text = r.json()
    assert isinstance(text, str)
    assert "You are a succinct chat bot" in text and "What's your favorite kind of boat?" in text
    head, _, generated = text.partition("Ahoy! ")
    assert head.endswith("<|im_start|>assistant\n"), "the assistant's turn starts with pre_response"
    assert generated.strip()


@pytest.mark.parametrize(("body", "status"), [({"max_length": 50}, 400), ({"prompt": ""}, 400),
                                              ({"prompt": "hi", "max_length": -1}, 400),
                                              ({"prompt": "hi", "model": "broken"}, 500)])
def test_llama_errors(compat: str, body: dict, status: int) -> None:
    r = post(compat, "/llama", body)
    assert r.status_code == status
    assert set(r.json()) == {"error"}


def test_llama_malformed_json(compat: str) -> None:
    r = httpx.post(f"{compat}/llama", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}


# -- API keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "shape"), [
    ("GET", "/api/models", {"detail"}),
    ("GET", "/v1/models", {"error"}),
    ("POST", "/generate", BOTH_SHAPES),
    ("POST", "/llama", {"error"}),
    ("GET", "/status", BOTH_SHAPES),
])
def test_keys_required_in_each_shape(keyed: str, method: str, path: str, shape: set[str]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YOUR_API_KEY"}):
        r = httpx.request(method, f"{keyed}{path}", headers=headers, json={})
        assert r.status_code == 401 and set(r.json()) == shape and r.headers["www-authenticate"] == "Bearer"
    ok = httpx.request(method, f"{keyed}{path}", headers={"Authorization": "Bearer other"},
                       json={"prompt": "hi", "max_tokens": 1} if method == "POST" else None, timeout=60)
    assert ok.status_code == 200, ok.text


def test_open_paths_and_openai_sdk(keyed: str) -> None:
    import openai

    for path in ("/health", "/docs", "/openapi.json"):
        assert httpx.get(f"{keyed}{path}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0).models.list()
    ids = [m.id for m in openai.OpenAI(base_url=f"{keyed}/v1", api_key="YOUR_API_KEY", max_retries=0).models.list()]
    assert "smollm2:135m" in ids


def test_keys_file(compat_home: Path, tmp_path: Path) -> None:
    """The file is read once, at start (as the README says): editing or deleting it later
    changes nothing until a restart, and no request fails for want of the file."""
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\nbeta\n")

    def status(key: str) -> int:
        return httpx.get(f"{url}/api/models", headers={"Authorization": f"Bearer {key}"}).status_code

    with running_server(Settings(home=compat_home, api_keys_file=keys)) as url:
        assert httpx.get(f"{url}/api/models").status_code == 401
        assert status("beta") == 200
        assert status("# team keys") == 401
        keys.write_text("gamma\n")
        assert (status("beta"), status("gamma")) == (200, 401)
        keys.unlink()
        assert (status("alpha"), status("gamma")) == (200, 401)


def test_warns_without_keys_beyond_loopback(compat_home: Path) -> None:
    import os
    import signal
    import time

    from tests.server import free_port

    port = free_port()
    env = dict(os.environ, MYLLM_HOME=str(compat_home))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "myllm"), "serve", "--host", "0.0.0.0", "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while "without API keys" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline() if proc.stderr else ""
        assert "without API keys" in seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
