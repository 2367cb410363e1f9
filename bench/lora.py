"""LoRA adapters (`make bench`): what an adapter costs per token, and what switching adapters
between steps costs when requests with different adapters run at once.

One daemon, SmolLM2 and two models over it, `tutor` and `poet`, each with its own random LoRA
adapter (rank 8 on attn_q, attn_v and ffn_down of every block, written by tests/lora_fixture.py),
so the three share one loaded base for the adapter models. Greedy `/v1/chat/completions`,
decode tokens/s from the runner's `timings` (two at once: their tokens over the wall time), medians of alternating rounds:
- one stream: the base model, then `tutor` (the adapter's extra products per token);
- two streams at once: the base twice, `tutor` twice (one adapter set: both in every step), and
  `tutor` with `poet` (two sets: llama.cpp applies adapters per context, so the steps alternate
  between them, and each step decodes one sequence).
Written to bench/results/lora.md and .json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from report import write_side
from servers import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rpc import smollm2  # noqa: E402  (the bench's folder is on the path)

from tests.lora_fixture import write_adapter  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def generate(url: str, model: str, max_tokens: int) -> tuple[int, float]:
    """Tokens generated and the runner's decode milliseconds."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": max_tokens}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    t = r.json()["timings"]
    return t["predicted_n"], t["predicted_ms"]


def decode(url: str, model: str, max_tokens: int) -> float:
    n, ms = generate(url, model, max_tokens)
    return n / (ms / 1000)


def together(url: str, models: tuple[str, str], max_tokens: int) -> float:
    """Aggregate decode tokens/s of two requests sent at once: their tokens over the wall time
    from sending both until the later one ends."""
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        tokens = sum(n for n, _ in pool.map(lambda m: generate(url, m, max_tokens), models))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="myllm-bench-lora-"))
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(args.threads), "MYLLM_NUM_CTX": "1024",
           "MYLLM_NUM_PARALLEL": "2", "MYLLM_KEEP_ALIVE": "-1", "MYLLM_OLLAMA_PORT": "0", "MYLLM_DRAFT_MAX": "0"}
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    server = None
    figures: dict[str, list[float]] = {"base, one stream": [], "tutor, one stream": [],
                                       "base + base, at once": [], "tutor + tutor, at once": [],
                                       "tutor + poet, at once": []}
    try:
        base = smollm2()
        subprocess.run([myllm_bin, "pull", str(base), "--name", "smollm2"], env=env, check=True, capture_output=True)
        for name, seed in (("tutor", 1), ("poet", 2)):
            write_adapter(base, home / f"{name}.gguf", seed=seed)
            (home / "Modelfile").write_text(f"FROM smollm2\nADAPTER ./{name}.gguf\n")
            subprocess.run([myllm_bin, "create", name, "-f", str(home / "Modelfile")], env=env, check=True,
                           capture_output=True)
        port = free_port()
        server = Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port)
        for model in ("smollm2", "tutor", "poet"):
            decode(server.url, model, 4)  # load, and load each adapter
        for _ in range(args.rounds):
            figures["base, one stream"].append(decode(server.url, "smollm2", args.max_tokens))
            figures["tutor, one stream"].append(decode(server.url, "tutor", args.max_tokens))
            figures["base + base, at once"].append(together(server.url, ("smollm2", "smollm2"), args.max_tokens))
            figures["tutor + tutor, at once"].append(together(server.url, ("tutor", "tutor"), args.max_tokens))
            figures["tutor + poet, at once"].append(together(server.url, ("tutor", "poet"), args.max_tokens))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)
    rows = [{"run": run, "decode_tokens_per_s": round(statistics.median(values), 1)} for run, values in figures.items()]
    meta = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "date": time.strftime("%Y-%m-%d"),
            "load_average": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}
    lines = ["# LoRA adapters", "",
             f"SmolLM2, {args.threads} threads, rank-8 adapters on attn_q, attn_v and ffn_down, greedy, "
             f"`max_tokens` {args.max_tokens}, medians of {args.rounds} rounds (bench/lora.py). Load average at "
             f"the end {meta['load_average']} on {meta['cores']} cores.", "",
             "| run | decode tokens/s (aggregate when two) |", "| --- | ---: |",
             *(f"| {r['run']} | {r['decode_tokens_per_s']} |" for r in rows)]
    write_side("lora", meta, rows, lines)


if __name__ == "__main__":
    main()
