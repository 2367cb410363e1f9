"""Retrieval models in myllm against llama-server `--embedding` / `--rerank` on the same files:
(a) the same vectors, scores and token counts; (b) the throughput of 1,000 short inputs through
`/v1/embeddings`, side by side.

No small encoder or reranker is on the package index, so tests/encoder_fixture.py writes BERT
encoders as llama.cpp's converter writes bge-small and bge-reranker, with random weights (a
throwaway folder, under a second): a mean-pooled and a CLS-pooled embedding model and a
cross-encoder reranker for (a); for (b) a larger mean-pooled one of all-MiniLM-L6's shape (384
wide, 6 layers, 6 heads), so the figure is the encoder's work, not HTTP's.

One myllm daemon holds every model (`myllm pull` of each file); each file gets its own
llama-server (it serves one model), with the same threads. (a) sends the same texts and
query-document pairs to both and compares what comes back: each vector's largest difference, each
score's, and the prompt tokens both report (llama-server runs attention with flash attention,
myllm's embedding engine without: a difference of about 1e-4 in a vector's values, a few 1e-3 in
a raw score, is that). (b) sends the 1,000 inputs as one request and, apart, as 1,000 single-input
requests 16 at a time, each `--rounds` times with the servers in turn (ABBA); the ratio is the
median of each round's myllm / llama-server inputs per second (above 1: myllm is faster).
Both run as a user starts them, with their defaults but threads: llama-server's own slots and
context (4 to 64 slots of 512 tokens each, and larger batches, were all slower in a trial here).

Written to bench/results/retrieval.md and retrieval.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rounds import alternate, median, paired_ratio, progress
from servers import NO_KEEPALIVE, Pair, Server, free_port, llama_server_binary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from myllm.runtime.engine.llama_setup import cpu_has_amx  # noqa: E402
from tests.encoder_fixture import WORDS, EncoderShape, write_encoder  # noqa: E402

MINILM = EncoderShape(width=384, heads=6, ffn=1536, layers=6)
MODELS = {"enc-mean": ("mean", EncoderShape()), "enc-cls": ("cls", EncoderShape()), "rerank": ("rank", EncoderShape()),
          "minilm-shape": ("mean", MINILM)}
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "hello world", "music and art",
         "which city has the best food", "the river runs to the sea " * 12]
QUERY = "which animal sat on the mat"
DOCUMENTS = ["the cat sat on the mat", "a dog ran in the park", "fish swim in the sea", "the cat is a small animal",
             "computer network server client request response error memory disk speed " * 6]
VECTOR_TOLERANCE, SCORE_TOLERANCE = 1e-3, 1e-2


def short_inputs(n: int, seed: int = 1) -> list[str]:
    """`n` different short texts (4 to 12 words of the fixture's vocabulary)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def llama_server(binary: str, gguf: Path, threads: int, mode: list[str]) -> Server:
    port = free_port()
    return Server(f"llama-server {gguf.stem}", [
        binary, "-m", str(gguf), "-t", str(threads), "--port", str(port), "--host", "127.0.0.1", *mode,
        # myllm's runners keep weights in plain buffers on AMX CPUs (engine/llama_setup.py).
        *(["--no-repack"] if cpu_has_amx() else [])], dict(os.environ), port)


def embed(url: str, model: str, texts: list[str]) -> tuple[list[list[float]], int]:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts, "encoding_format": "float"}, timeout=600)
    r.raise_for_status()
    body = r.json()
    return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], int(body["usage"]["prompt_tokens"])


def rerank(url: str, model: str) -> tuple[dict[int, float], int]:
    r = httpx.post(f"{url}/v1/rerank", json={"model": model, "query": QUERY, "documents": DOCUMENTS}, timeout=600)
    r.raise_for_status()
    body = r.json()
    return {x["index"]: x["relevance_score"] for x in body["results"]}, int(body["usage"]["prompt_tokens"])


def agreement(myllm: str, servers: dict[str, Server]) -> tuple[list[str], int, int]:
    """(a): Markdown rows, checks agreeing, checks."""
    rows, agree, checks = [], 0, 0
    for name in ("enc-mean", "enc-cls", "minilm-shape"):
        (ours, n_ours), (theirs, n_theirs) = embed(myllm, name, TEXTS), embed(servers[name].url, name, TEXTS)
        worst = max(abs(a - b) for u, v in zip(ours, theirs) for a, b in zip(u, v))
        same = len(ours) == len(theirs) and all(len(u) == len(v) for u, v in zip(ours, theirs)) \
            and worst <= VECTOR_TOLERANCE and n_ours == n_theirs
        rows.append(f"| {name} ({MODELS[name][0]}) | /v1/embeddings, {len(TEXTS)} inputs | {worst:.1e} | "
                    f"{n_ours} / {n_theirs} | {'yes' if same else 'NO'} |")
        agree, checks = agree + same, checks + 1
    (ours_s, n_ours), (theirs_s, n_theirs) = rerank(myllm, "rerank"), rerank(servers["rerank"].url, "rerank")
    worst = max(abs(ours_s[i] - theirs_s[i]) / max(1.0, abs(theirs_s[i])) for i in theirs_s)
    same = ours_s.keys() == theirs_s.keys() and worst <= SCORE_TOLERANCE and n_ours == n_theirs \
        and sorted(ours_s, key=lambda i: -ours_s[i]) == sorted(theirs_s, key=lambda i: -theirs_s[i])
    rows.append(f"| rerank (rank) | /v1/rerank, {len(DOCUMENTS)} documents | {worst:.1e} (relative) | "
                f"{n_ours} / {n_theirs} | {'yes' if same else 'NO'} |")
    return rows, agree + same, checks + 1


def one_request(inputs: list[str]) -> Any:
    def run(url: str, model: str) -> float:
        started = time.perf_counter()
        vectors, _ = embed(url, model, inputs)
        assert len(vectors) == len(inputs)
        return len(inputs) / (time.perf_counter() - started)
    return run


def single_requests(inputs: list[str], concurrency: int) -> Any:
    def run(url: str, model: str) -> float:
        async def all_of_them() -> None:
            gate = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=NO_KEEPALIVE) as http:
                async def one(text: str) -> None:
                    async with gate:
                        r = await http.post("/v1/embeddings", json={"model": model, "input": text})
                        r.raise_for_status()
                await asyncio.gather(*(one(t) for t in inputs))
        started = time.perf_counter()
        asyncio.run(all_of_them())
        return len(inputs) / (time.perf_counter() - started)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--concurrency", type=int, default=16, help="single-input requests in flight at once")
    parser.add_argument("--llama-server", help="llama-server binary (default: make bench's, built once)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "retrieval")
    args = parser.parse_args()
    binary = args.llama_server or llama_server_binary()
    folder = Path(tempfile.mkdtemp(prefix="myllm-bench-retrieval-"))
    files = {name: write_encoder(folder / f"{name}.gguf", pooling, shape) for name, (pooling, shape) in MODELS.items()}  # type: ignore[arg-type]
    home = folder / "home"
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(args.threads), "MYLLM_KEEP_ALIVE": "-1"}
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    started: list[Server] = []
    try:
        for name, path in files.items():
            subprocess.run([myllm_bin, "pull", str(path), "--name", name], env=env, check=True, capture_output=True)
        port = free_port()
        myllm = Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port)
        started.append(myllm)
        servers = {}
        for name, (pooling, _) in MODELS.items():
            servers[name] = llama_server(binary, files[name], args.threads, ["--rerank"] if pooling == "rank" else ["--embedding"])
            started.append(servers[name])
        progress("vectors and scores")
        rows, agree, checks = agreement(myllm.url, servers)
        for name in ("enc-mean", "enc-cls", "rerank"):  # (b) needs only the larger model: less for the machine to run
            servers.pop(name).stop()
        inputs = short_inputs(args.inputs)
        pair: Pair = {"myllm": (myllm, "minilm-shape"), "llama_server": (servers["minilm-shape"], "minilm-shape")}
        for server, model in pair.values():  # loaded and warm before anything is timed
            embed(server.url, model, inputs[:64])
        figures: dict[str, dict[str, list[float]]] = {}
        progress(f"{args.inputs} inputs in one request, {args.rounds} rounds")
        figures["one request"] = alternate(pair, args.rounds, one_request(inputs))
        progress(f"{args.inputs} single-input requests, {args.concurrency} at once, {args.rounds} rounds")
        figures[f"single requests, {args.concurrency} at once"] = alternate(
            pair, args.rounds, single_requests(inputs, args.concurrency))
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    speed = [f"| {label} | {median(f['myllm']):.0f} | {median(f['llama_server']):.0f} | "
             f"{paired_ratio(f['myllm'], f['llama_server']):.2f}x |" for label, f in figures.items()]
    text = "\n".join([
        "Retrieval models (tests/encoder_fixture.py: BERT encoders with random weights) in myllm and in llama-server "
        "`--embedding` / `--rerank` on the same files.", "",
        "Vectors, scores and prompt tokens (largest difference of any value; tokens myllm / llama-server):", "",
        "| model (pooling) | request | largest difference | prompt tokens | same |", "| --- | --- | --- | --- | --- |",
        *rows, "", f"{agree} of {checks} the same.", "",
        f"Throughput: {args.inputs} short inputs (4 to 12 words) through `/v1/embeddings`, an encoder of all-MiniLM-L6's "
        f"shape, {args.threads} threads each, {args.rounds} rounds in turn; inputs per second (medians) and the median "
        "of each round's ratio:", "",
        "| how they are sent | myllm | llama-server | myllm / llama-server |", "| --- | --- | --- | --- |", *speed])
    args.results.with_suffix(".md").write_text(text + "\n")
    args.results.with_suffix(".json").write_text(json.dumps({"agree": agree, "checks": checks, "throughput": figures},
                                                            indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
