"""/metrics scraped with prometheus_client's parser around real requests: counters and
histograms move by what the requests did (tokens equal to the usage the API returned)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from myllm.settings import Settings
from tests.server import running_servers

CHAT = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hello there"}], "options": {"max_tokens": 6}}


@pytest.fixture(scope="module")
def urls(models_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=models_home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_by_what_requests_did(urls: tuple[str, str]) -> None:
    main, ollama = urls
    httpx.post(f"{main}/api/chat", json=CHAT, timeout=60)  # loaded, warm
    before = scrape(main)
    usage = httpx.post(f"{main}/api/chat", json=CHAT, timeout=60).json()["usage"]
    second = httpx.post(f"{ollama}/api/chat", json={**CHAT, "stream": False, "options": {"num_predict": 4}}, timeout=60).json()
    after = scrape(main)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    completion = usage["completion_tokens"] + second["eval_count"]
    assert moved("myllm_tokens_total", model="smollm2:135m", kind="completion") == completion
    prompt_seen = moved("myllm_tokens_total", model="smollm2:135m", kind="prompt") + moved(
        "myllm_tokens_total", model="smollm2:135m", kind="cached")
    assert prompt_seen == usage["prompt_tokens"] + second["prompt_eval_count"]
    assert moved("myllm_tokens_total", model="smollm2:135m", kind="cached") > 0  # the second turn reused the first's KV
    assert moved("myllm_time_to_first_token_seconds_count", model="smollm2:135m") == 2
    assert moved("myllm_time_per_output_token_seconds_count", model="smollm2:135m") == 2
    assert moved("myllm_requests_total", api="native", route="/api/chat", status="200") == 1
    assert moved("myllm_requests_total", api="ollama", route="/api/chat", status="200") == 1
    assert moved("myllm_request_duration_seconds_count", api="native", route="/api/chat") == 1
    assert value(after, "myllm_loaded_models") >= 1 and value(after, "myllm_memory_budget_bytes") > 0
    assert value(after, "myllm_model_memory_bytes", model="smollm2:135m") > 50 << 20
    assert value(after, "myllm_queue_depth", model="smollm2:135m") == 0
    assert value(after, "myllm_model_loads_total", model="smollm2:135m") >= 1
    assert value(after, "myllm_model_load_seconds_count", model="smollm2:135m") >= 1


def test_unloads_and_unknown_routes_are_counted(urls: tuple[str, str]) -> None:
    main, _ = urls
    httpx.post(f"{main}/api/models/gemma3:270m/load", timeout=60)
    before = scrape(main)
    httpx.post(f"{main}/api/models/gemma3:270m/unload", timeout=60)
    httpx.get(f"{main}/no/such/route")
    httpx.get(f"{main}/api/sessions/one-id")
    httpx.get(f"{main}/api/sessions/another-id")
    after = scrape(main)
    assert value(after, "myllm_model_evictions_total", model="gemma3:270m", reason="unload") - value(
        before, "myllm_model_evictions_total", model="gemma3:270m", reason="unload") == 1
    assert value(after, "myllm_requests_total", api="native", route="unmatched", status="404") >= 1
    # One series per route template, whatever ids the paths carry.
    assert value(after, "myllm_requests_total", api="native", route="/api/sessions/{session_id}", status="404") - value(
        before, "myllm_requests_total", api="native", route="/api/sessions/{session_id}", status="404") == 2


def test_metrics_need_an_admin_key(models_home: Path) -> None:
    settings = Settings(home=models_home, num_threads=2, api_keys="admin", inference_keys="user")
    with running_servers(settings) as (main, _):
        assert httpx.get(f"{main}/metrics", headers={"Authorization": "Bearer user"}).status_code == 403
        assert httpx.get(f"{main}/metrics", headers={"Authorization": "Bearer admin"}).status_code == 200
        assert httpx.get(f"{main}/metrics").status_code == 401


def test_ps_shows_the_queue(urls: tuple[str, str]) -> None:
    main, _ = urls
    long = {"model": "smollm2:135m", "stream": True, "options": {"max_tokens": 400, "temperature": 0},
            "messages": [{"role": "user", "content": "Write a long story."}]}
    with httpx.stream("POST", f"{main}/api/chat", json=long, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        [model] = [m for m in httpx.get(f"{main}/api/ps").json()["models"] if m["name"] == "smollm2:135m"]
        assert model["busy"] == 1 and model["slots"] == 4 and model["queued"] == 0 and model["memory_mb"] > 50
