"""Retrieval models through the daemon, with the official clients: the encoder fixtures
(tests/encoder_fixture.py: a mean-pooled and a CLS-pooled embedding model and a cross-encoder
reranker) made by Ollama's create, asked for embeddings by the `openai` SDK (float, base64,
`dimensions`), the `ollama` client (`truncate`, `dimensions`) and the native API, and for rankings
by `cohere`'s clients (v2 and v1) and `httpx` in Jina's shape, on every rerank path and on both
ports. Vectors, scores and token counts are those of the same files evaluated directly through
llama-cpp-python's bindings, as llama-server evaluates them (tests/retrieval_reference.py;
bench/retrieval.py shows that reference equal to llama-server itself). Limits and every use of a
model for what it is not are each API's own 400.

Tolerances: llama-server (and the reference) run attention with flash attention, myllm's
embedding engine without; that moves a vector's values by about 1e-4 and a score by a few 1e-3
(a score here is a random classifier's raw output, around 1 to 5). A wrong token layout or
pooling moves them by tenths.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import anthropic
import cohere
import httpx
import ollama
import openai
import pytest

from myllm.settings import Settings
from tests.conftest import writable_home
from tests.encoder_fixture import POOLING_TYPES, write_encoder
from tests.retrieval_reference import N_CTX, Reference
from tests.server import running_servers

pytestmark = pytest.mark.slow

EMBED, CLS, RERANK, CHAT = "enc:mean", "enc:cls", "rerank:tiny", "smollm2:135m"
MAX_DOCUMENTS, MAX_DOCUMENT_BYTES = 8, 4096
VECTOR_TOLERANCE = 1e-3
QUERY = "which animal sat on the mat"
DOCUMENTS = ["the cat sat on the mat", "a dog ran in the park", "fish swim in the sea", "the cat is a small animal"]
TEXTS = ["the cat sat", "a dog ran in the park", "hello world", "music and art"]
LONG = "the cat sat on the mat and the dog ran " * 80  # 720 tokens, 3120 bytes: past the 512 tokens an encoder takes


def close_score(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-2 * max(1.0, abs(want))


def close_vector(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) <= VECTOR_TOLERANCE


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("encoders")
    return {name: write_encoder(folder / f"{pooling}.gguf", pooling)  # type: ignore[arg-type]
            for name, pooling in ((EMBED, "mean"), (CLS, "cls"), (RERANK, "rank"))}


@pytest.fixture(scope="module")
def references(files: dict[str, Path]) -> Iterator[dict[str, Reference]]:
    refs = {name: Reference(path, POOLING_TYPES[pooling])
            for (name, path), pooling in zip(files.items(), ("mean", "cls", "rank"))}
    yield refs
    for ref in refs.values():
        ref.close()


@pytest.fixture(scope="module")
def urls(models_home: Path, tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Iterator[tuple[str, str]]:
    home = writable_home(models_home, tmp_path_factory.mktemp("retrieval-api") / "home")
    settings = Settings(home=home, num_threads=2, num_ctx=1024, max_rerank_documents=MAX_DOCUMENTS,
                        max_document_bytes=MAX_DOCUMENT_BYTES)
    with running_servers(settings) as urls:
        client = ollama.Client(host=urls[1], timeout=120)
        for name, path in files.items():
            blob = client.create_blob(path)
            assert [p.status for p in client.create(model=name, files={path.name: blob}, stream=True)][-1] == "success"
        yield urls


@pytest.fixture(scope="module")
def main(urls: tuple[str, str]) -> str:
    return urls[0]


@pytest.fixture(scope="module")
def oclient(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


@pytest.fixture(scope="module")
def oai(main: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{main}/v1", api_key="unused", max_retries=0, timeout=120)


def ranked(ref: Reference, query: str, documents: list[str]) -> tuple[list[tuple[int, float]], int]:
    """The reference's (index, score) best first, and the pairs' tokens."""
    scored = [ref.score(query, d) for d in documents]
    return sorted(((i, s) for i, (s, _) in enumerate(scored)), key=lambda p: -p[1]), sum(n for _, n in scored)


def assert_ranked(results: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in results] == [i for i, _ in want[: len(results)]]
    assert all(close_score(got, score) for (_, got), (_, score) in zip(results, want)), (results, want)


# -- rerank --------------------------------------------------------------------------------------


def test_cohere_v2_client_ranks_as_the_reference(urls: tuple[str, str], references: dict[str, Reference]) -> None:
    want, _ = ranked(references[RERANK], QUERY, DOCUMENTS)
    for url in urls:  # the main port and Ollama's
        co = cohere.ClientV2(base_url=url, api_key="unused", timeout=120)
        r = co.rerank(model=RERANK, query=QUERY, documents=DOCUMENTS)
        assert_ranked([(x.index, x.relevance_score) for x in r.results], want)
        assert len(r.results) == len(DOCUMENTS)
        top = co.rerank(model=RERANK, query=QUERY, documents=DOCUMENTS, top_n=2)
        assert [(x.index, x.relevance_score) for x in top.results] == [(x.index, x.relevance_score) for x in r.results[:2]]


def test_cohere_v1_client_with_object_documents_returns_them(main: str, references: dict[str, Reference]) -> None:
    want, _ = ranked(references[RERANK], QUERY, DOCUMENTS)
    co = cohere.Client(base_url=main, api_key="unused", timeout=120)
    r = co.rerank(model=RERANK, query=QUERY, documents=[{"text": d} for d in DOCUMENTS], top_n=3, return_documents=True)
    assert_ranked([(x.index, x.relevance_score) for x in r.results], want)
    assert len(r.results) == 3 and all(x.document is not None and x.document.text == DOCUMENTS[x.index] for x in r.results)


def test_jina_shape_on_every_path_and_port(urls: tuple[str, str], references: dict[str, Reference]) -> None:
    want, tokens = ranked(references[RERANK], QUERY, DOCUMENTS)
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1], "id": "kept-aside"}, *DOCUMENTS[2:]]
    body = {"model": RERANK, "query": QUERY, "documents": documents, "top_n": 3, "return_documents": True}
    answers = [httpx.post(f"{url}{path}", json=body, timeout=120)
               for url in urls for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")]
    first = answers[0].json()
    assert first["model"] == RERANK and first["object"] == "list"
    assert first["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert_ranked([(x["index"], x["relevance_score"]) for x in first["results"]], want)
    assert [x["document"] for x in first["results"]] == [{"text": DOCUMENTS[x["index"]]} for x in first["results"]]
    assert all(a.status_code == 200 and a.json() == first for a in answers)
    bare = httpx.post(f"{urls[0]}/v1/rerank", json={"model": RERANK, "query": QUERY, "documents": DOCUMENTS}, timeout=120)
    assert all("document" not in x for x in bare.json()["results"]) and len(bare.json()["results"]) == len(DOCUMENTS)


def test_native_rerank(main: str, references: dict[str, Reference]) -> None:
    want, tokens = ranked(references[RERANK], QUERY, DOCUMENTS)
    r = httpx.post(f"{main}/api/rerank", json={"model": RERANK, "query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                                               "return_documents": True}, timeout=120).json()
    assert r["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert_ranked([(x["index"], x["relevance_score"]) for x in r["results"]], want)
    assert [x["document"] for x in r["results"]] == [DOCUMENTS[i] for i, _ in want[:2]]


def test_a_pair_past_the_batch_is_refused_or_its_document_cut(main: str, references: dict[str, Reference]) -> None:
    ref = references[RERANK]
    assert len(ref.pair(QUERY, LONG)) > N_CTX
    body = {"model": RERANK, "query": QUERY, "documents": [DOCUMENTS[0], LONG]}
    refused = httpx.post(f"{main}/v1/rerank", json=body, timeout=120)
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_request_error" and "documents[1]" in refused.json()["error"]["message"]
    cut_score = ref.pooled(ref.pair(QUERY, LONG)[:N_CTX])[0]  # this vocabulary adds no mark after the document
    for path, extra in (("/v1/rerank", {"truncate": True}), ("/v2/rerank", {})):  # Cohere's v2 truncates by default
        r = httpx.post(f"{main}{path}", json={**body, **extra}, timeout=120).json()
        [got] = [x["relevance_score"] for x in r["results"] if x["index"] == 1]
        assert close_score(got, cut_score)
    native = httpx.post(f"{main}/api/rerank", json={**body, "truncate": False}, timeout=120)
    assert native.status_code == 400 and "documents[1]" in native.json()["detail"]


@pytest.mark.parametrize(("body", "says"), [
    ({"documents": ["x"] * (MAX_DOCUMENTS + 1)}, f"more than the {MAX_DOCUMENTS} a request may send"),
    ({"documents": ["cat", "cat " * 1025]}, f"documents[1] is more than the {MAX_DOCUMENT_BYTES} bytes"),
    ({"query": "cat " * 1025}, f"query is more than the {MAX_DOCUMENT_BYTES} bytes"),
    ({"documents": []}, "documents must not be empty"),
    ({"top_n": 0}, "top_n must be at least 1"),
    ({"documents": [{"title": "no text"}]}, "documents.0"),
    ({"model": CHAT}, f'"{CHAT}" is a chat model: it does not support reranking'),
    ({"model": EMBED}, f'"{EMBED}" is an embedding model: it does not support reranking'),
])
def test_rerank_limits_and_wrong_kinds_are_llama_servers_400(urls: tuple[str, str], body: dict, says: str) -> None:
    request = {"model": RERANK, "query": QUERY, "documents": DOCUMENTS, **body}
    for url in urls:
        r = httpx.post(f"{url}/v1/rerank", json=request, timeout=120)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert says in r.json()["error"]["message"], r.json()
    native = httpx.post(f"{urls[0]}/api/rerank", json=request, timeout=120)
    assert native.status_code == 400 and set(native.json()) == {"detail"}
    with pytest.raises(cohere.BadRequestError):
        cohere.ClientV2(base_url=urls[0], api_key="unused").rerank(model=EMBED, query=QUERY, documents=DOCUMENTS)


# -- embeddings ----------------------------------------------------------------------------------


def shortened(vector: list[float], dimensions: int) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector[:dimensions]))
    return [x / norm for x in vector[:dimensions]]


def test_openai_embeddings_float_base64_and_dimensions(oai: openai.OpenAI, references: dict[str, Reference]) -> None:
    for name in (EMBED, CLS):
        want = [references[name].embedding(t) for t in TEXTS]
        r = oai.embeddings.create(model=name, input=TEXTS)
        assert all(close_vector(d.embedding, v) for d, (v, _) in zip(r.data, want))
        assert r.usage.prompt_tokens == sum(n for _, n in want) and [d.index for d in r.data] == [0, 1, 2, 3]
        raw = oai.embeddings.with_raw_response.create(model=name, input=TEXTS[0], encoding_format="base64").parse()
        packed = base64.b64decode(raw.data[0].embedding)  # type: ignore[arg-type]
        assert close_vector(list(struct.unpack(f"<{len(packed) // 4}f", packed)), want[0][0])
        short = oai.embeddings.create(model=name, input=TEXTS[:2], dimensions=16)
        assert all(close_vector(d.embedding, shortened(v, 16)) for d, (v, _) in zip(short.data, want))
    sdk_default = oai.embeddings.create(model=EMBED, input=TEXTS[1])  # the SDK asks for base64 and decodes it
    assert close_vector(sdk_default.data[0].embedding, references[EMBED].embedding(TEXTS[1])[0])


def test_openai_embeddings_refuse_long_inputs_and_bad_dimensions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=EMBED, input=["a cat", LONG])
    assert "512" in info.value.message
    for dimensions, says in ((65, "dimensions must be 1 to 64"), (0, "greater than or equal to 1")):
        with pytest.raises(openai.BadRequestError) as info:
            oai.embeddings.create(model=EMBED, input="a cat", dimensions=dimensions)
        assert says in info.value.message and info.value.body["param"] == "dimensions"  # type: ignore[index]


def test_ollama_embed_truncates_by_default_and_shortens(oclient: ollama.Client, references: dict[str, Reference]) -> None:
    ref = references[EMBED]
    want = [ref.embedding(t) for t in TEXTS]
    r = oclient.embed(model=EMBED, input=TEXTS)
    assert all(close_vector(list(got), v) for got, (v, _) in zip(r.embeddings, want))
    assert r.prompt_eval_count == sum(n for _, n in want)
    short = oclient.embed(model=EMBED, input=TEXTS[0], dimensions=8)
    assert close_vector(list(short.embeddings[0]), shortened(want[0][0], 8))
    long = oclient.embed(model=EMBED, input=LONG)  # Ollama truncates by default: the first 512 tokens
    cut = ref.pooled(ref.tokenize(LONG, True, True)[:N_CTX])
    norm = math.sqrt(sum(x * x for x in cut))
    assert close_vector(list(long.embeddings[0]), [x / norm for x in cut]) and long.prompt_eval_count == N_CTX
    with pytest.raises(ollama.ResponseError) as info:
        oclient.embed(model=EMBED, input=LONG, truncate=False)
    assert info.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as info:
        oclient.embed(model=EMBED, input="a cat", dimensions=65)
    assert info.value.status_code == 400 and "dimensions must be 1 to 64" in info.value.error
    old = oclient.embeddings(model=CLS, prompt=TEXTS[2])
    assert close_vector(list(old.embedding), references[CLS].embedding(TEXTS[2])[0])


def test_native_embeddings(main: str, references: dict[str, Reference]) -> None:
    r = httpx.post(f"{main}/api/embeddings", json={"model": CLS, "input": TEXTS[:2]}, timeout=120).json()
    assert all(close_vector(got, references[CLS].embedding(t)[0]) for got, t in zip(r["embeddings"], TEXTS))


# -- each model for what it is not ---------------------------------------------------------------


def test_embeddings_from_a_reranker_are_a_400_everywhere(urls: tuple[str, str], oai: openai.OpenAI,
                                                         oclient: ollama.Client) -> None:
    says = f'"{RERANK}" is a reranking model: it does not support embeddings'
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=RERANK, input="a cat")
    assert says in info.value.message and info.value.code == "wrong_model_kind"
    with pytest.raises(ollama.ResponseError) as info:
        oclient.embed(model=RERANK, input="a cat")
    assert info.value.status_code == 400 and info.value.error == says
    native = httpx.post(f"{urls[0]}/api/embeddings", json={"model": RERANK, "input": "a cat"}, timeout=120)
    assert native.status_code == 400 and native.json() == {"detail": says}


@pytest.mark.parametrize(("model", "kind"), [(EMBED, "an embedding"), (RERANK, "a reranking")])
def test_chat_on_a_retrieval_model_is_a_400_everywhere(urls: tuple[str, str], oai: openai.OpenAI,
                                                       oclient: ollama.Client, model: str, kind: str) -> None:
    says = f'"{model}" is {kind} model: it does not support'
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=hi)  # type: ignore[arg-type]
    assert says + " chat" in info.value.message and info.value.code == "wrong_model_kind"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="Hi")
    for call, use in ((lambda: oclient.chat(model=model, messages=hi), "chat"),
                      (lambda: oclient.generate(model=model, prompt="Hi"), "generate")):
        with pytest.raises(ollama.ResponseError) as oinfo:
            call()
        assert oinfo.value.status_code == 400 and oinfo.value.error == f"{says} {use}"
    claude = anthropic.Anthropic(base_url=urls[0], api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        claude.messages.create(model=model, max_tokens=8, messages=hi)  # type: ignore[arg-type]
    assert says + " chat" in ainfo.value.message and ainfo.value.body["type"] == "error"  # type: ignore[index]
    native = httpx.post(f"{urls[0]}/api/chat", json={"model": model, "messages": hi}, timeout=120)
    assert native.status_code == 400 and native.json() == {"detail": says + " chat"}
