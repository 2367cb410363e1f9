"""LoRA adapters (runtime/engine/adapters.py and their path from a Modelfile's ADAPTER line or
Ollama's create to a request): written with the `gguf` package for SmolLM2 (tests/lora_fixture.py).
An adapter with zero B matrices must give the base model's tokens and a random one other tokens;
requests with different adapters share one loaded base, also in the same steps, and KV computed
with one adapter never serves a request with another."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from myllm.create import create_model
from myllm.errors import InvalidModelFile, ModelLoadError
from myllm.registry.store import Registry
from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine_types import AdapterSet, DoneEvent, Failed, GenerationRequest, LoadSpec
from myllm.runtime.request.options import GenerationOptions
from myllm.settings import Settings
from tests.lora_fixture import write_adapter
from tests.server import running_servers

PROMPT = ("A lighthouse keeper lived alone on a rocky island far from the coast. Every evening he climbed "
          "the stairs to light the lamp, and every morning he wrote in his journal. One day")
"""Over the RAM cache's 32-token minimum, so that KV of it is kept there too."""


@pytest.fixture(scope="module")
def adapters(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {"zero": write_adapter(smollm2_path, folder / "zero.gguf", zero=True),
            "one": write_adapter(smollm2_path, folder / "one.gguf", seed=1),
            "two": write_adapter(smollm2_path, folder / "two.gguf", seed=2)}


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Any:
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 512, n_parallel=3), n_threads=2, kv_cache_bytes=64 << 20)
    yield engine
    engine.close()


def submit(engine: BatchEngine, tokens: list[int], adapters: AdapterSet, done: queue.SimpleQueue[Any]) -> None:
    request = GenerationRequest(list(tokens), GenerationOptions(temperature=0, max_tokens=12), adapters=adapters)
    out: list[int] = []

    def sink(items: list[tuple[Any, Any]]) -> None:
        for _, event in items:
            if isinstance(event, DoneEvent | Failed):
                done.put((adapters, out, event))
            else:
                out.append(event.token_id)

    engine.submit(request, sink)


def run(engine: BatchEngine, *requests: AdapterSet) -> list[list[int]]:
    """Each adapter set's greedy tokens for PROMPT, all submitted at once, in the order given."""
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    tokens = engine.tokenize(PROMPT)
    for adapters in requests:
        submit(engine, tokens, adapters, done)
    results = {}
    for _ in requests:
        adapters, out, event = done.get(timeout=120)
        if isinstance(event, Failed):
            raise event.error
        results[adapters] = out
    return [results[adapters] for adapters in requests]


@pytest.fixture(scope="module")
def one_slot(smollm2_path: Path) -> Any:
    """One sequence and the RAM prefix cache: every request takes the KV the last one left."""
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 512), n_threads=2, kv_cache_bytes=64 << 20)
    yield engine
    engine.close()


def test_a_zero_adapter_changes_nothing_and_a_random_one_changes_the_output(
        one_slot: BatchEngine, smollm2_path: Path, adapters: dict[str, Path]) -> None:
    reference = BatchEngine(LoadSpec("smollm2", smollm2_path, 512), n_threads=2, kv_cache_bytes=0)
    try:
        [base] = run(reference, ())
    finally:
        reference.close()
    one = ((str(adapters["one"]), 1.0),)
    [with_one] = run(one_slot, one)
    assert with_one != base
    # From here each request finds KV of the same prompt computed with another set, in the slot
    # or in the RAM cache: none of it may serve it.
    assert run(one_slot, ()) == [base]
    assert run(one_slot, ((str(adapters["zero"]), 1.0),)) == [base]
    assert run(one_slot, one) == [with_one]
    assert run(one_slot, ()) == [base]
    [half] = run(one_slot, ((str(adapters["one"]), 0.5),))  # another scale is another set
    assert half not in (base, with_one)


def test_requests_with_different_adapters_run_side_by_side(engine: BatchEngine, adapters: dict[str, Path]) -> None:
    one, two = ((str(adapters["one"]), 1.0),), ((str(adapters["two"]), 1.0),)
    for warm in ((), one, two):  # each set's KV of the prompt in a slot of its own: every run below reuses it
        run(engine, warm)  # (a prompt evaluated in other chunks may give other last bits, and near-ties flip)
    alone = [run(engine, s)[0] for s in ((), one, two)]
    assert run(engine, (), one, two) == alone
    assert len({tuple(tokens) for tokens in alone}) == 3


def test_an_adapter_llama_cpp_refuses_fails_its_request_only(engine: BatchEngine, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="LoRA adapter bad.gguf"):
        run(engine, ((str(bad), 1.0),))
    assert run(engine, ()) == run(engine, ())


# -- through the daemon: Ollama's create, a Modelfile's ADAPTER, requests ----------------------------


@pytest.fixture
def daemon(private_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=private_home, num_threads=2, num_ctx=1024, num_parallel=2)) as urls:
        yield urls


def test_adapter_models_share_one_base_and_requests_pick_scales(
        daemon: tuple[str, str], private_home: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    url, ollama_url = daemon
    client = ollama.Client(host=ollama_url, timeout=120)
    digest = client.create_blob(adapters["one"])
    client.create(model="tutor", from_="smollm2:135m", adapters={"one.gguf": digest})
    (tmp_path / "two.gguf").write_bytes(adapters["two"].read_bytes())
    (tmp_path / "Modelfile").write_text("FROM smollm2:135m\nADAPTER ./two.gguf\nPARAMETER temperature 0\n")
    registry = Registry.open(Settings(home=private_home))
    try:
        create_model(registry, Settings(home=private_home), "poet", (tmp_path / "Modelfile").read_text(), tmp_path)
    finally:
        registry.close()
    openai_client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")

    def say(model: str, **extra: Any) -> str:
        answer = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                                  extra_body=extra)
        return answer.choices[0].text

    base, tutor, poet = say("smollm2:135m"), say("tutor"), say("poet")
    assert len({base, tutor, poet}) == 3
    assert say("tutor", lora=[{"id": 0, "scale": 0}]) == base  # the adapter off for one request
    assert say("tutor") == tutor
    loaded = [m.model for m in client.ps().models]
    base_blob = next(m.digest for m in client.list().models if m.model == "smollm2:135m")
    assert sorted(loaded) == ["sha256-" + base_blob.removeprefix("sha256:")[:12], "smollm2:135m"]  # tutor and poet: one
    with pytest.raises(openai.BadRequestError, match="lora id 1"):
        say("tutor", lora=[{"id": 1, "scale": 1.0}])
    shown = httpx.get(f"{url}/api/models/tutor").json()  # the native API, which `myllm show` reads
    assert shown["adapters"] == [{"digest": digest.removeprefix("sha256:"), "size": adapters["one"].stat().st_size}]
    assert httpx.get(f"{url}/api/models/smollm2:135m").json()["adapters"] == []


def test_an_adapter_for_another_model_is_refused_at_create(
        daemon: tuple[str, str], smollm2_path: Path, gemma3_path: Path, tmp_path: Path) -> None:
    _, ollama_url = daemon
    client = ollama.Client(host=ollama_url, timeout=120)
    for wrong, reason in ((write_adapter(gemma3_path, tmp_path / "gemma.gguf"), "architecture"),
                          (smollm2_path, "not a LoRA adapter")):
        with pytest.raises(ollama.ResponseError, match=reason) as refused:
            client.create(model="wrong", from_="smollm2:135m", adapters={"x.gguf": client.create_blob(wrong)})
        assert refused.value.status_code == 400
    assert "wrong" not in [m.model for m in client.list().models]
    (tmp_path / "Modelfile").write_text("FROM smollm2:135m\nADAPTER ./gemma.gguf\n")
    with pytest.raises(InvalidModelFile, match="architecture 'gemma3'"):
        registry = Registry.open(Settings())
        try:
            create_model(registry, Settings(), "wrong", (tmp_path / "Modelfile").read_text(), tmp_path)
        finally:
            registry.close()
