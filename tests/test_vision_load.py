"""Images under load: 20 requests at once, each with its own image (and one whose image is
refused among them), on a vision model with 2 slots and a short queue. Each answers, with its
own image's prompt token count (libmtmd's for llama-server's rendering), or is turned away with
OpenAI's 503; the refused image is its 400 and disturbs no other; the runner is the same
process afterwards and answers a plain request.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import ollama
import psutil
import pytest

from myllm.registry.store import Registry
from myllm.settings import Settings
from tests import server
from tests.conftest import writable_home
from tests.mtmd_reference import Reference
from tests.server import running_servers
from tests.vision_fixture import VisionModel, png_image

pytestmark = pytest.mark.slow

MODEL = "smolvlm:load"
QUESTION = "What is in this image?"
CLIENTS = 20
SLOTS = 2
QUEUE = 8


@pytest.fixture(scope="module")
def url(models_home: Path, tmp_path_factory: pytest.TempPathFactory, vision: VisionModel) -> Iterator[str]:
    home = writable_home(models_home, tmp_path_factory.mktemp("vision-load") / "home")
    settings = Settings(home=home, num_threads=2, num_ctx=1024, num_parallel=SLOTS, max_queue=QUEUE)
    with running_servers(settings) as (main, ollama_url):
        client = ollama.Client(host=ollama_url, timeout=120)
        files = {path.name: client.create_blob(path) for path in (vision.text, vision.projector)}
        assert [p.status for p in client.create(model=MODEL, files=files, stream=True)][-1] == "success"
        yield main


def runner_pids() -> list[int]:
    """The runners of this module's daemon (the last one tests/server.py built): other modules'
    daemons in this process may still have theirs."""
    assert server.LAST_APP is not None
    instances = server.LAST_APP.state.services.runtime.manager._instances.values()
    return sorted(pid for inst in instances if (pid := inst.runner.pid) is not None and psutil.pid_exists(pid))


def prompt_tokens(reference: Reference, prompt: str, image: bytes) -> int:
    """What llama-server counts for `prompt` with `image` (libmtmd's tokenizing alone: this count
    needs no evaluation)."""
    status, chunks = reference.tokenize(prompt, [image])
    try:
        assert status == 0
        return int(reference.mtmd.mtmd_helper_get_n_tokens(chunks))
    finally:
        reference.mtmd.mtmd_input_chunks_free(chunks)


def body(image: bytes, stream: bool) -> dict[str, Any]:
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}}
    out: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": stream,
                           "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


async def ask(http: httpx.AsyncClient, image: bytes, stream: bool) -> tuple[int, dict[str, Any], str | None]:
    """(status, the answer's usage or the error body, Retry-After); a stream read to its end."""
    async with http.stream("POST", "/v1/chat/completions", json=body(image, stream)) as r:
        if r.status_code != 200 or not stream:
            payload = json.loads(await r.aread())
            return r.status_code, payload.get("usage") or payload, r.headers.get("retry-after")
        events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
        assert all("error" not in e for e in events), events
        return r.status_code, events[-1]["usage"], None


def test_twenty_image_requests_on_two_slots_answer_or_are_turned_away(url: str, reference: Reference) -> None:
    assert server.LAST_APP is not None
    registry: Registry = server.LAST_APP.state.services.registry
    template = jinja2.Environment().from_string(registry.get(MODEL).template)
    images = [png_image(8 + 4 * (i % 5), 8 + 8 * (i // 5), seed=100 + i) for i in range(CLIENTS)]
    prompt = template.render(messages=[{"role": "user", "content": reference.marker + QUESTION}],
                             add_generation_prompt=True, bos_token="", eos_token="")
    want = [prompt_tokens(reference, prompt, image) for image in images]

    plain = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=plain, timeout=120).status_code == 200  # loaded
    before = runner_pids()
    assert len(before) == 1

    async def refused(http: httpx.AsyncClient) -> tuple[int, dict[str, Any], str | None]:
        """A request whose image is refused, sent first; turned away while the preparation
        queue is full, it is sent again (it must reach the image check while the others run)."""
        for _ in range(50):
            result = await ask(http, b"\x89PNG but not really an image", stream=False)
            if result[0] != 503:
                break
            await asyncio.sleep(0.1)
        return result

    async def run() -> list[tuple[int, dict[str, Any], str | None]]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            return await asyncio.gather(refused(http),
                                        *(ask(http, image, stream=i % 2 == 0) for i, image in enumerate(images)))

    bad, *results = asyncio.run(run())
    assert bad[0] == 400 and bad[1]["error"]["code"] == "invalid_image", bad
    answered = [i for i, (status, _, _) in enumerate(results) if status == 200]
    turned_away = [result for result in results if result[0] != 200]
    print(f"\n{CLIENTS} image requests on {SLOTS} slots, queue {QUEUE}: {len(answered)} answered, "
          f"{len(turned_away)} turned away ({sorted({e['error']['message'][-30:] for _, e, _ in turned_away})})")
    assert answered, "some were answered"
    assert all(status == 503 and error["error"]["code"] == "overloaded" and retry
               for status, error, retry in turned_away), turned_away
    assert [results[i][1]["prompt_tokens"] for i in answered] == [want[i] for i in answered]
    assert runner_pids() == before, "the runner is the same process"
    again = httpx.post(f"{url}/v1/chat/completions", json=plain, timeout=120)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
