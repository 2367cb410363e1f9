"""Issue 27, cases 6, 8, 12, 13 and 14: runners that abort on every request, options that reload
models, client texts and nestings that used to be 500s, forged log lines and forged SSE events.

Each numbered case runs against a real daemon (tests/hostile.py) while Bob, a bystander with his
own key, keeps getting `/health` and a one-token chat; the pure logic behind each has its own
unit tests here."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from gguf import GGUFValueType as T
from openai._streaming import SSEDecoder

from myllm.api.http import sse
from myllm.api.http.bodies import check_json_body
from myllm.api.server import EscapeControls
from myllm.errors import InvalidModelFile, InvalidOptions, ModelCrashed, TooManyReloads
from myllm.registry.gguf_check import check_gguf
from myllm.registry.store import Registry
from myllm.runtime.devices import NO_GPU, Devices
from myllm.runtime.engine_types import context_size
from myllm.runtime.placement.manager import ModelManager
from myllm.runtime.placement.reloads import Rate, ReloadLimit
from myllm.runtime.runner.client import without_paths
from myllm.settings import Settings
from tests.hostile import ADMIN, ALICE, MODEL, Hostile, hostile_daemon, key, still_answering
from tests.hostile_gguf import rewrite_gguf
from tests.test_gguf_check import write_model
from tests.test_gpu import fake_gpu
from tests.test_manager_logic import FakeRunner, add_fake_row

# -- case 6: float hyperparameters, and runners that abort on every request --------------------

BAD_FLOATS: dict[str, tuple[dict[str, tuple[Any, T]], str]] = {
    "rms epsilon NaN": ({"llama.attention.layer_norm_rms_epsilon": (math.nan, T.FLOAT32)},
                        "'llama.attention.layer_norm_rms_epsilon' is nan"),
    "rms epsilon negative": ({"llama.attention.layer_norm_rms_epsilon": (-1e-5, T.FLOAT32)}, "is -1e-05;"),
    "layer norm epsilon infinite": ({"llama.attention.layer_norm_epsilon": (math.inf, T.FLOAT32)},
                                    "'llama.attention.layer_norm_epsilon' is inf"),
    "rope freq base NaN (float64)": ({"llama.rope.freq_base": (math.nan, T.FLOAT64)}, "'llama.rope.freq_base' is nan"),
    "rope scaling factor negative": ({"llama.rope.scaling.factor": (-2.0, T.FLOAT32)}, "is -2;"),
    "final logit softcapping -inf": ({"llama.final_logit_softcapping": (-math.inf, T.FLOAT32)}, "is -inf"),
    "a key llama.cpp has not named yet": ({"llama.some_future_scale": (math.nan, T.FLOAT32)}, "is nan"),
    "NaN in a per-layer array": ({"llama.swiglu_clamp_exp": ([1.0, math.nan], T.ARRAY)}, "is nan"),
}


@pytest.mark.parametrize("case", list(BAD_FLOATS))
def test_float_hyperparameters_must_be_finite_and_not_negative(case: str, tmp_path: Path) -> None:
    keys, problem = BAD_FLOATS[case]
    path = write_model(tmp_path / "floats.gguf", keys)
    with pytest.raises(InvalidModelFile) as info:
        check_gguf(path, "floats.gguf")
    assert info.value.message.startswith("floats.gguf is not a model llama.cpp can load: "), info.value.message
    assert problem in info.value.message and "a hyperparameter must be a finite number, at least 0" in info.value.message


def test_signed_floats_of_real_models_pass(tmp_path: Path) -> None:
    """Gemma 3n stores -inf (the quantile of no sparsity), Apertus a negative xIELU epsilon:
    real files are not refused; only NaN is refused everywhere."""
    path = write_model(tmp_path / "real.gguf", {
        "llama.activation_sparsity_scale": ([1.6448, -math.inf], T.ARRAY),
        "xielu.eps": ([-1e-6], T.ARRAY),
        "general.sampling.temp": (-1.0, T.FLOAT32),  # metadata, not a hyperparameter
    })
    check_gguf(path, "real.gguf")
    with pytest.raises(InvalidModelFile, match="'xielu.eps' is nan"):
        check_gguf(write_model(tmp_path / "nan.gguf", {"xielu.eps": ([math.nan], T.ARRAY)}), "nan.gguf")


def test_runner_errors_quote_no_build_paths() -> None:
    said = ("killed by SIGABRT: /tmp/pip-install-a1b2/llama-cpp-python_3f/vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp:3721: "
            "GGML_ASSERT(eps >= 0.0f) failed; model /home/u/.myllm/blobs/sha256-abc")
    assert without_paths(said) == "killed by SIGABRT: ops.cpp:3721: GGML_ASSERT(eps >= 0.0f) failed; model sha256-abc"
    assert without_paths("see https://github.com/ggml-org/llama.cpp") == "see https://github.com/ggml-org/llama.cpp"


async def no_gpu() -> Devices:
    return NO_GPU


@pytest.fixture
def fakes(registry: Registry) -> Registry:
    FakeRunner.created = []
    FakeRunner.fail_next_with_oom = FakeRunner.crash_next = 0
    for name in ("a:1", "b:1"):
        add_fake_row(registry, name, 100)
    registry.problem = lambda row: None  # type: ignore[method-assign]  # fake rows have no blobs to check
    return registry


def fake_manager(registry: Registry, **settings: Any) -> ModelManager:
    return ModelManager(registry, Settings(num_ctx=512, kv_cache="0", **settings), runner_factory=FakeRunner.start,
                        budget=10_000 * 2**20, devices=no_gpu)


async def test_a_runner_that_keeps_crashing_on_requests_is_backed_off(fakes: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashes while serving count like crashes while loading: the `crash_limit`th within the
    window refuses the model (nothing loaded) for 30 s with Retry-After, doubling after the next
    crash; a model quiet for a whole window starts afresh."""
    from myllm.runtime.placement import manager as manager_module

    clock = [1000.0]
    monkeypatch.setattr(manager_module.time, "monotonic", lambda: clock[0])
    mgr = fake_manager(fakes, crash_limit=3, crash_window=600)

    async def crash_once() -> None:
        lease = await mgr.acquire("a:1")
        lease.release()
        lease.runner.on_exit(lease.runner, ModelCrashed("the runner of model 'a:1' stopped (killed by SIGABRT)"))
        clock[0] += 1

    await crash_once()
    await crash_once()  # two crashes: still loaded again
    await crash_once()
    assert len(FakeRunner.created) == 3
    with pytest.raises(ModelCrashed, match=r"crashed its runner 3 times in the last 3s .*not trying again for 29s \(until") as info:
        await mgr.acquire("a:1")
    assert info.value.retry_after == 29 and len(FakeRunner.created) == 3, "refused without a load"
    (await mgr.acquire("b:1")).release()  # other models load meanwhile
    clock[0] += 30
    await crash_once()
    with pytest.raises(ModelCrashed, match="not trying again for 59s"):
        await mgr.acquire("a:1")
    clock[0] += 61 + 600  # quiet for a window: the next crash is one crash
    await crash_once()
    lease = await mgr.acquire("a:1")
    lease.release()
    await mgr.close()


# -- case 8: options that reload a model --------------------------------------------------------


def test_context_sizes_share_steps() -> None:
    assert [context_size(n) for n in (1, 256, 257, 512, 513, 768, 769, 1024, 1500, 2048, 3000, 5000, 8193)] == [
        256, 256, 512, 512, 768, 768, 1024, 1024, 1536, 2048, 3072, 6144, 12288]
    sizes = {context_size(n) for n in range(256, 8193, 256)}
    assert len(sizes) == 10, "32 padding steps up to 8192 are 10 sizes"
    assert all(n <= context_size(n) <= max(256, n * 3 // 2 + 256) for n in range(1, 70_000, 97))


async def test_num_gpu_only_matters_when_it_changes_the_load(fakes: Registry) -> None:
    """Without a GPU every num_gpu is the same instance; with one, any value at or beyond the
    model's offloadable layers is -1 (all that fit)."""
    mgr = fake_manager(fakes)
    for layers in (-1, 0, 1, 7, 999):
        (await mgr.acquire("a:1", num_gpu=layers)).release()
    assert FakeRunner.created == ["a:1"], "one load on a machine without a GPU"
    await mgr.close()

    row = fakes.get("a:1")
    row.details = {"block_count": 10}

    async def gpu() -> Devices:
        return fake_gpu(free_mib=10_000)

    mgr = ModelManager(fakes, Settings(num_ctx=512), runner_factory=FakeRunner.start, devices=gpu)
    await mgr.devices()
    assert mgr.spec_for(row, num_gpu=11).n_gpu_layers == mgr.spec_for(row, num_gpu=500).n_gpu_layers == -1
    assert mgr.spec_for(row, num_gpu=10).n_gpu_layers == 10
    await mgr.close()


async def test_reloads_per_key_are_limited(fakes: Registry) -> None:
    """Loads that add a second instance of a loaded model, or evict one, count per key; past
    the rate, 429 with Retry-After and nothing loaded or evicted; reusing an instance, and
    callers without a limited key, are never counted."""
    from sqlalchemy import update

    from myllm.registry.schema import models

    with fakes.engine.begin() as conn:
        conn.execute(update(models).values(context_length=8192))
    mgr = fake_manager(fakes, reloads_per_key="2/minute", max_loaded_models=2)
    (await mgr.acquire("a:1", caller="alice")).release()  # a first load costs nobody
    for ctx in (1024, 2048):
        (await mgr.acquire("a:1", num_ctx=ctx, caller="alice")).release()
    with pytest.raises(TooManyReloads, match="MYLLM_RELOADS_PER_KEY") as info:
        await mgr.acquire("a:1", num_ctx=4096, caller="alice")
    assert 0 < info.value.retry_after <= 60
    loaded = sorted((m.name, m.context_length) for m in mgr.loaded())
    (await mgr.acquire("a:1", num_ctx=2048, caller="alice")).release()  # the loaded instance: free
    (await mgr.acquire("a:1", num_ctx=4096, caller="bob")).release()  # another key's own budget
    assert len(loaded) == 2 and FakeRunner.created.count("a:1") == 4
    (await mgr.acquire("b:1", num_ctx=8192)).release()  # an admin (no key to limit)
    await mgr.close()


def test_rate_setting_is_checked() -> None:
    assert Rate.parse("6/minute", "reloads_per_key") == Rate(6, 60.0)
    with pytest.raises(InvalidOptions, match="MYLLM_RELOADS_PER_KEY must look like"):
        Rate.parse("often", "reloads_per_key")
    limit = ReloadLimit(Rate(1, 10.0))
    limit.take("k", "m", 0.0)
    with pytest.raises(TooManyReloads):
        limit.take("k", "m", 9.0)
    limit.take("k", "m", 10.0)


# -- case 12: client texts and nestings ---------------------------------------------------------


@pytest.mark.parametrize(("body", "said"), [
    ({"options": {"stop": ["ok", "a\ud800"]}}, "options.stop[1] contains a lone surrogate"),
    ({"metadata": {"k\udfff": "v"}}, "a key in metadata contains a lone surrogate"),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages[0].content contains a NUL character"),
    ({"x": [[[[[[[[[[1]]]]]]]]]]}, "x[0][0][0][0][0][0][0] nests arrays and objects deeper than 8 levels"),
])
def test_every_string_of_a_body_is_text_and_nesting_is_bounded(body: dict, said: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        check_json_body(body, max_depth=8)
    assert said in info.value.message
    check_json_body({"x": [[[[[[[1]]]]]]], "ok": "text \u00e9 \U0001f600"}, max_depth=8)


def test_a_body_check_builds_no_path_it_does_not_report() -> None:
    """Each value's path used to be spelled out as the walk went: a 24 KB body (a 20,000-character
    key over 2,000 items) took 40 MB, a 4 MB one terabytes. Paths are spelled only for an error."""
    import tracemalloc

    tracemalloc.start()
    try:
        check_json_body({"k" * 20_000: [0] * 2_000}, max_depth=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak
    with pytest.raises(InvalidOptions) as info:
        check_json_body({"k" * 20_000: ["\ud800"]}, max_depth=64)
    assert info.value.message.startswith("k" * 200 + "…")


# -- case 13: log lines ---------------------------------------------------------------------------


def test_log_arguments_are_escaped_in_the_text_log() -> None:
    record = logging.LogRecord("myllm.access", logging.INFO, __file__, 1, "%s %d; last output:\n%s",
                               ("GET /x\nINFO forged \x1b[31m", 404, "line\rtwo"), None)
    assert EscapeControls().filter(record)
    assert record.getMessage() == "GET /x\\nINFO forged \\x1b[31m 404; last output:\nline\\rtwo"


# -- case 14: SSE frames ----------------------------------------------------------------------------


def parse_sse(chunks: Iterator[bytes]) -> list[tuple[str | None, str]]:
    """(event, data) of each event, as the OpenAI SDK's standard SSE parser reads them."""
    return [(e.event, e.data) for e in SSEDecoder().iter_bytes(chunks)]


@pytest.mark.parametrize("text", ["\revent: forged\rdata: x\r\r", "a\r\n\r\nevent: forged\n", "\r\r\r\n\n"])
def test_a_text_cannot_forge_sse_events(text: str) -> None:
    frames = [sse.event("message", text), sse.data(text), sse.event("done", "[DONE]")]
    events = parse_sse(iter(frame.encode() for frame in frames))
    assert [name for name, _ in events] == ["message", None, "done"], events
    assert events[0][1] == events[1][1] == text.replace("\r\n", "\n").replace("\r", "\n")


# -- the daemon cases ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """One daemon for the cases that do not interfere (12, 13, 14)."""
    with hostile_daemon(models_home, tmp_path_factory.mktemp("runner") / "home") as h:
        yield h


def runner_pids(h: Hostile, model: str) -> list[int]:
    pids = []
    for child in psutil.Process(h.daemon.proc.pid).children():
        try:
            if "myllm.runtime.runner" in child.cmdline() and model in child.cmdline():
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def register_unchecked(home: Path, name: str, source: Path, broken: Path) -> None:
    """Register `source` as `name`, then point the row at `broken`'s bytes (a file the check
    refuses), as a file registered before the check knew better would be."""
    from sqlalchemy import update

    from myllm.pull import pull
    from myllm.registry.blobs import sha256_file
    from myllm.registry.schema import models

    registry = Registry.open(Settings(home=home))
    try:
        row = pull(registry, Settings(home=home), str(source), name=name).model
        digest = sha256_file(broken)
        shutil.copy(broken, registry.blobs.path(digest))
        with registry.engine.begin() as conn:
            conn.execute(update(models).where(models.c.id == row.id).values(digest=digest))
    finally:
        registry.close()


def test_case6_a_model_aborting_every_request_is_backed_off(models_home: Path, smollm2_path: Path, tmp_path: Path) -> None:
    """A GGUF whose rms epsilon is NaN loads, then aborts its runner (GGML_ASSERT) on every
    request. The check refuses it now; one registered before (here: behind the check's back)
    is backed off after MYLLM_CRASH_LIMIT crashes: refused at once, loading and evicting
    nothing, so Bob's model (the only one that fits: MYLLM_MAX_LOADED_MODELS=1) stays loaded."""
    nan = rewrite_gguf(smollm2_path, tmp_path / "nan.gguf",
                       keys={"llama.attention.layer_norm_rms_epsilon": (math.nan, T.FLOAT32)})
    with pytest.raises(InvalidModelFile, match="layer_norm_rms_epsilon' is nan"):
        check_gguf(nan, "nan.gguf")
    home = tmp_path / "home"
    # Flash attention off: with it on, a CPU load measures attention with a decode, which this
    # model aborts, and the load's crash is backed off instead (tests/test_runner_crash.py).
    with hostile_daemon(models_home, home, MYLLM_MAX_LOADED_MODELS="1", MYLLM_CRASH_LIMIT="2",
                        MYLLM_FLASH_ATTENTION="off") as h:
        register_unchecked(home, "nan", smollm2_path, nan)
        body = {"model": "nan", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                "options": {"max_tokens": 1}}
        with still_answering(h):
            first = [httpx.post(f"{h.url}/api/chat", json=body, headers=key(ALICE), timeout=60) for _ in range(2)]
            for r in first:
                assert r.status_code == 500, r.text
                assert "stopped (killed by SIGABRT" in r.json()["detail"] and "GGML_ASSERT" in r.json()["detail"]
                assert "/" not in r.json()["detail"].split("SIGABRT")[1], "no build path"
            assert h.chat().status_code == 200
            bob = runner_pids(h, MODEL)
            for _ in range(5):  # refused without a load: the message says so, the runners are unchanged
                r = httpx.post(f"{h.url}/api/chat", json=body, headers=key(ALICE), timeout=60)
                assert r.status_code == 500 and r.json()["detail"].startswith("model 'nan:latest' crashed its runner 2 times")
                assert "not trying again for" in r.json()["detail"] and int(r.headers["Retry-After"]) > 0
            assert runner_pids(h, MODEL) == bob and len(bob) == 1, "Bob's model was neither evicted nor reloaded"
            assert runner_pids(h, "nan") == []


def test_case8_cycling_num_gpu_and_num_ctx_cannot_evict_everyone(models_home: Path, tmp_path: Path) -> None:
    """Alice cycles num_gpu (a CPU build: one instance for every value) and then num_ctx: past
    MYLLM_RELOADS_PER_KEY her loads get 429 with Retry-After and load nothing."""
    with hostile_daemon(models_home, tmp_path / "home", MYLLM_RELOADS_PER_KEY="2/minute") as h:
        def chat(options: dict[str, Any]) -> httpx.Response:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                    "options": {"max_tokens": 1, **options}}
            return httpx.post(f"{h.url}/api/chat", json=body, headers=key(ALICE), timeout=60)

        with still_answering(h):
            before = runner_pids(h, MODEL)
            for layers in (0, 1, 2, 5, 31, 99):
                assert chat({"num_gpu": layers}).status_code == 200
            assert runner_pids(h, MODEL) == before, "num_gpu on a CPU build loads nothing"
            answers = [chat({"num_ctx": ctx}) for ctx in (300, 700, 1500, 2000, 3000, 4000, 6000)]
            assert [r.status_code for r in answers] == [200, 200, 429, 429, 429, 429, 429], "two reloads, then 429s"
            assert "MYLLM_RELOADS_PER_KEY" in answers[2].json()["detail"] and int(answers[2].headers["Retry-After"]) > 0
            assert chat({"num_ctx": 1000}).status_code == 200, "the loaded instance (1024) costs nothing"
            assert len(runner_pids(h, MODEL)) <= 3


def same_connection(client: httpx.Client, url: str, r: httpx.Response, probe: str = "/health") -> None:
    """`r` left its connection open and usable: the next request on the client goes over it."""
    assert r.headers.get("connection") != "close", r.headers
    port = r.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
    again = client.get(f"{url}{probe}")
    assert again.status_code == 200
    assert again.extensions["network_stream"].get_extra_info("socket").getsockname()[1] == port, "a new connection"


def test_case12_unchecked_texts_and_nestings_are_4xx_on_a_kept_connection(daemon: Hostile) -> None:
    h = daemon
    nested = "[" * 990 + "]" * 990
    main: list[tuple[str, dict[str, Any], str]] = [
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "options": {"stop": ["\ud800"]}},
         "options.stop[0] contains a lone surrogate"),
        ("/llama", {"model": MODEL, "prompt": "Hi", "pre_response": "x\udc00"}, "pre_response contains a lone surrogate"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure\ud83d"}]},
         "messages[1].content contains a lone surrogate"),
        ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "metadata": {"note": "\ud800"}},
         "metadata.note contains a lone surrogate"),
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": nested}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
         "messages[1].tool_calls[0].function.arguments nests deeper than 64 levels"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "format": json.loads(
            '{"type": "array", "items": ' * 300 + '{"type": "string"}' + "}" * 300)}, "nests arrays and objects deeper"),
    ]
    with still_answering(h), httpx.Client(timeout=60, headers=key(ALICE)) as client:
        # A template that overflows only on a message it was not checked with.
        template = ("{% for m in messages %}{% if 'boom' in m.content %}{{ range(10**20)|length }}{% endif %}"
                    "{{ m.content }}{% endfor %}")
        created = httpx.post(f"{h.ollama}/api/create", headers=key(ADMIN), timeout=60,
                             json={"model": "overflow", "from": MODEL, "template": template, "stream": False})
        assert created.status_code == 200, created.text
        r = client.post(f"{h.ollama}/api/chat", json={"model": "overflow", "stream": False, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "boom"}]})
        assert r.status_code == 400 and "OverflowError" in r.json()["error"], r.text
        same_connection(client, h.ollama, r, "/api/version")

        for path, body, said in main:
            raw = json.dumps(body)  # lone surrogates go as escapes, as a hostile client sends them
            r = client.post(f"{h.url}{path}", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
            assert said in r.text, (path, r.text[:300])
            same_connection(client, h.url, r)

        r = client.post(f"{h.ollama}/api/pull", json={"model": "x" * 10_000, "stream": False}, headers=key(ADMIN))
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
        same_connection(client, h.ollama, r, "/api/version")
        r = client.post(f"{h.ollama}/api/pull", json={"model": "a/" + "b" * 300 + ".gguf", "stream": False},
                        headers=key(ADMIN))
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])


def test_case13_a_path_cannot_forge_log_lines(daemon: Hostile) -> None:
    h = daemon
    with still_answering(h):
        r = httpx.get(f"{h.url}/x%0AINFO%20forged%20line%1B%5B31m%0D", headers=key(ALICE), timeout=10)
        assert r.status_code == 404
        deadline = time.monotonic() + 5
        while not any("forged" in line for line in h.daemon.output) and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [line for line in h.daemon.output if "forged" in line]
    assert lines, "the request's log line"
    assert all("\\nINFO forged line\\x1b[31m\\r" in line for line in lines), lines
    assert not any("\x1b" in line or line.lstrip().startswith("INFO forged") for line in h.daemon.output)


def test_case14_model_output_cannot_forge_sse_events(daemon: Hostile) -> None:
    """The model is led (greedy, a prompt of bare-CR SSE lines) to write "\\revent: forged\\r";
    a stop sequence that starts the same way holds that text back and lets it out as one piece,
    so it would be one frame. Read by a standard SSE parser, every event is the route's own."""
    h = daemon
    body = {"model": MODEL, "prompt": "event: forged\r" * 5 + "event: forged", "max_length": 12, "temperature": 0,
            "stop": ["\revent: forged\rnever"]}
    with still_answering(h):
        with httpx.stream("POST", f"{h.url}/stream", json=body, headers=key(ALICE), timeout=60) as r:
            assert r.status_code == 200
            events = parse_sse(r.iter_bytes())
    assert {name for name, _ in events} == {"message", "done"}, events
    assert "forged" in "".join(data for name, data in events if name == "message"), f"the model wrote the forgery: {events}"
