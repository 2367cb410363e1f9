"""Speculative decoding with a draft model (runtime/engine/draft_model.py), on the real models:
SmolLM2 drafting for itself, whose greedy drafts are what the model picks itself, so at
temperature 0 (without a repeat penalty, which the draft model does not apply) every draft is
accepted, and the output is the output without speculation. Prompt and output stay under 256 KV
cells, where a verify row's logits equal a one-row decode's bit for bit (tests/test_speculative.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from myllm.errors import ModelLoadError
from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine_types import DoneEvent, LoadSpec, TokenEvent
from tests.engine_calls import generate as generate_tokens
from tests.test_cli import myllm

PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
OTHER = "<|im_start|>user\nList five uses of a brick.<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 120
"""Short prompts and this many tokens stay under 256 cells."""


def generate(engine: BatchEngine, text: str, **options: Any) -> tuple[list[TokenEvent], DoneEvent]:
    return generate_tokens(engine, engine.tokenize(text), **options)


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Any:
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 512, n_parallel=2, draft_max=8, draft=smollm2_path),
                         n_threads=2, kv_cache_bytes=0)
    yield engine
    engine.close()


def test_greedy_output_is_identical_and_every_draft_accepted(engine: BatchEngine) -> None:
    plain, plain_done = generate(engine, PROMPT, temperature=0, repeat_penalty=1.0, max_tokens=MAX_TOKENS,
                                 draft_max=0)
    fast, done = generate(engine, PROMPT, temperature=0, repeat_penalty=1.0, max_tokens=MAX_TOKENS)
    assert [e.token_id for e in fast] == [e.token_id for e in plain]
    assert (done.text, done.finish_reason) == (plain_done.text, plain_done.finish_reason)
    assert plain_done.draft_tokens == 0
    assert done.draft_tokens > done.completion_tokens / 2, done  # it speculated by default, with the draft model
    assert done.draft_accepted == done.draft_tokens, done


def test_a_repeat_penalty_rejects_drafts_but_not_the_output(engine: BatchEngine) -> None:
    """The request's sampler penalizes repeats, the draft model's argmax does not: some drafts are
    rejected, and the output is still the model's own."""
    plain, _ = generate(engine, PROMPT, temperature=0, repeat_penalty=1.3, max_tokens=MAX_TOKENS, draft_max=0)
    fast, done = generate(engine, PROMPT, temperature=0, repeat_penalty=1.3, max_tokens=MAX_TOKENS, draft_max=8)
    assert [e.token_id for e in fast] == [e.token_id for e in plain]
    assert 0 < done.draft_accepted < done.draft_tokens, done


def test_sampled_output_with_a_seed_is_the_same_with_a_draft_model(engine: BatchEngine) -> None:
    options = dict(temperature=0.9, top_k=40, seed=77, max_tokens=MAX_TOKENS)
    plain, _ = generate(engine, PROMPT, **options, draft_max=0)
    fast, done = generate(engine, PROMPT, **options)
    assert [e.token_id for e in fast] == [e.token_id for e in plain]
    assert done.draft_accepted > 0


def test_concurrent_slots_draft_together_and_each_output_is_its_own(engine: BatchEngine) -> None:
    """Two requests speculating at once: each output is what it is alone, and their drafts share
    the draft model's decodes (one per draft position for both), so together they take far fewer
    than the two took one after the other."""
    assert engine.draft_models is not None
    greedy = dict(temperature=0, repeat_penalty=1.0, max_tokens=MAX_TOKENS)
    alone, decodes_alone = {}, 0
    for text in (PROMPT, OTHER):
        before = engine.draft_models.decodes
        alone[text] = [e.token_id for e in generate(engine, text, **greedy)[0]]
        decodes_alone += engine.draft_models.decodes - before
    results: dict[str, list[int]] = {}
    before = engine.draft_models.decodes
    threads = [threading.Thread(target=lambda t=text: results.__setitem__(
        t, [e.token_id for e in generate(engine, t, **greedy)[0]])) for text in (PROMPT, OTHER)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone
    decodes = engine.draft_models.decodes - before
    assert decodes < 0.75 * decodes_alone, (decodes, decodes_alone)


def test_a_draft_model_of_another_vocabulary_is_refused_at_load(smollm2_path: Path, gemma3_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="another vocabulary"):
        BatchEngine(LoadSpec("smollm2", smollm2_path, 512, draft_max=8, draft=gemma3_path), n_threads=2,
                    kv_cache_bytes=0)


# -- the setting: Modelfile DRAFT, Ollama create's `draft`, the registry -----------------------------


def smollm2_variant(smollm2_path: Path, where: Path) -> Path:
    """SmolLM2's file with one byte of its name changed: another blob, the same vocabulary."""
    data = bytearray(smollm2_path.read_bytes())
    at = data.index(b"Smollm2 135M")
    data[at + 6 : at + 7] = b"3"
    path = where / "smollm3-variant.gguf"
    path.write_bytes(bytes(data))
    return path


def test_modelfile_draft_is_checked_and_keeps_its_blob(private_home: Path, smollm2_path: Path, tmp_path: Path) -> None:
    from myllm.create import create_model
    from myllm.modelfile import ModelfileError, parse, render
    from myllm.pull import pull
    from myllm.registry.store import Registry
    from myllm.settings import Settings

    assert parse(render(parse("FROM smollm2:135m\nDRAFT smollm2:135m\n"))).draft == "smollm2:135m"
    settings = Settings()
    registry = Registry.open(settings)
    try:
        with pytest.raises(ModelfileError, match="line 3: the draft model 'gemma3:270m' has another vocabulary"):
            create_model(registry, settings, "mixed", "FROM smollm2:135m\n# a comment\nDRAFT gemma3:270m\n", tmp_path)
        assert registry.find("mixed") is None
        with pytest.raises(ModelfileError, match="line 2: the draft model 'nothing:1b' is not a registered model"):
            create_model(registry, settings, "mixed", "FROM smollm2:135m\nDRAFT nothing:1b\n", tmp_path)
        pull(registry, settings, str(smollm2_variant(smollm2_path, tmp_path)), name="variant")
        variant = registry.get("variant")
        row = create_model(registry, settings, "drafted", "FROM smollm2:135m\nDRAFT variant\n", tmp_path)
        assert (row.draft_digest, row.draft_size) == (variant.digest, variant.size)
        # `myllm show` names it (the registry answers: no daemon runs here)
        shown = json.loads(myllm("show", "drafted", "--json").stdout)
        assert (shown["draft_digest"], shown["draft_size"], shown["adapters"]) == (variant.digest, variant.size, [])
        assert f"model {variant.digest}" in " ".join(myllm("show", "drafted").stdout.split())
        assert json.loads(myllm("show", "smollm2:135m", "--json").stdout)["draft_digest"] is None
        assert registry.draft_file(row) == registry.blobs.path(variant.digest)
        registry.remove("variant")
        assert registry.blobs.exists(variant.digest)  # still the draft of `drafted`
        assert variant.digest not in registry.unused_blobs()
        registry.remove("drafted")
        assert not registry.blobs.exists(variant.digest)
    finally:
        registry.close()


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from myllm.settings import Settings
    from tests.conftest import writable_home
    from tests.server import running_servers

    home = writable_home(models_home, tmp_path_factory.mktemp("draft-api") / "home")
    with running_servers(Settings(home=home, num_threads=2, num_ctx=512, num_parallel=2, draft_max=8)) as urls:
        yield urls


def test_ollama_create_refuses_a_draft_of_another_vocabulary(urls: tuple[str, str]) -> None:
    """The official client's `create` has no `draft` parameter, so the route is called as it is."""
    import httpx

    r = httpx.post(f"{urls[1]}/api/create", json={"model": "mixed", "from": "smollm2:135m", "draft": "gemma3:270m",
                                                   "stream": False}, timeout=120)
    assert r.status_code == 400, r.text
    assert "another vocabulary" in r.json()["error"] and "tokens 262144 where the model has 49152" in r.json()["error"]
    assert httpx.post(f"{urls[1]}/api/show", json={"model": "mixed"}).status_code == 404


def test_a_model_created_with_a_draft_speculates_with_it(urls: tuple[str, str]) -> None:
    """SmolLM2 drafting for itself through the daemon: the same greedy text as the model alone,
    every draft accepted, the counts in Ollama's final event and in /metrics."""
    import httpx
    import ollama

    r = httpx.post(f"{urls[1]}/api/create", json={"model": "smollm2-drafted", "from": "smollm2:135m",
                                                   "draft": "smollm2:135m", "stream": False}, timeout=120)
    assert r.status_code == 200, r.text
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 60}
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    plain = ollama.Client(host=urls[1], timeout=300).chat(model="smollm2:135m", messages=messages, options=options)
    # The official client's response type drops the extension fields: the final event as sent.
    r = httpx.post(f"{urls[1]}/api/chat", json={"model": "smollm2-drafted", "messages": messages, "options": options,
                                                 "stream": False}, timeout=300)
    done = r.json()
    assert done["message"]["content"] == plain.message.content
    assert done["draft_count"] > 0 and done["draft_accepted_count"] == done["draft_count"], done
    from prometheus_client.parser import text_string_to_metric_families

    counted = {s.labels["kind"]: s.value for family in text_string_to_metric_families(httpx.get(f"{urls[0]}/metrics").text)
               for s in family.samples
               if s.name == "myllm_tokens_total" and s.labels.get("model") == "smollm2-drafted:latest"}
    assert counted["drafted"] == counted["draft_accepted"] == done["draft_count"], counted
    detail, base = (httpx.get(f"{urls[0]}/api/models/{name}").json() for name in ("smollm2-drafted", "smollm2:135m"))
    assert (detail["draft_digest"], detail["draft_size"]) == (base["digest"], base["size"])
    assert base["draft_digest"] is None and base["draft_size"] is None
    ps = {m["name"]: m for m in httpx.get(f"{urls[1]}/api/ps").json()["models"]}
    assert ps["smollm2-drafted:latest"]["draft_count"] == ps["smollm2-drafted:latest"]["draft_accepted_count"] == (
        done["draft_count"])
    assert "draft_count" not in ps["smollm2:135m"]


def test_the_memory_estimate_counts_the_draft_model_in_ram(shared_registry: Any) -> None:
    from myllm.runtime.placement.memory import estimate, footprint

    row = shared_registry.get("smollm2:135m")
    drafted = shared_registry.get("smollm2:135m")
    drafted.draft_digest, drafted.draft_size = row.digest, row.size  # SmolLM2 drafting for itself
    plain, with_draft = estimate(row, 2048), estimate(drafted, 2048)
    # Its file, and KV and compute buffers as large as the model's own.
    assert with_draft.total - plain.total == row.size + plain.kv_cache + plain.compute
    assert footprint(drafted, 2048).split(0).ram == with_draft.total
    for layers in (1, 10, 31):  # on the CPU however many of the model's layers are offloaded
        assert footprint(drafted, 2048).split(layers).ram - footprint(row, 2048).split(layers).ram == (
            row.size + plain.kv_cache + plain.compute)
        assert footprint(drafted, 2048).split(layers).vram == footprint(row, 2048).split(layers).vram
    assert estimate(drafted, 2048, embedding=True).total == estimate(row, 2048, embedding=True).total
