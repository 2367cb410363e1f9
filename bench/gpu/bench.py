"""The GPU check's measuring and reporting (run.sh calls it; each verb prints one JSON document).

    python3 bench.py freeport [N]                      N free TCP ports on 127.0.0.1
    python3 bench.py wait URL [--timeout S]            until URL/health answers 200
    python3 bench.py inproc MODEL.gguf [--out F]       llama-cpp-python in process, all layers on the GPU
    python3 bench.py servers --a NAME=URL@MODEL --b NAME=URL@MODEL [--rounds 2] [--out F]
    python3 bench.py report WORKDIR --md F --json F    gpu_results.md / .json from what WORKDIR holds

Server measurements use one client for both servers, over /v1/completions with streaming,
the prompt "Once upon a time", temperature 0; every figure is taken `rounds` times, A then B
each round (A B A B), so the two servers' samples of one figure lie close together in time:
  decode      one stream of 256 tokens: (tokens - 1) / (last text chunk - first text chunk)
  ttft        median of 9 requests with max_tokens 1: request sent -> first event with choices
  agg4/agg16  4 or 16 concurrent streams of 256 tokens (one asyncio httpx client): all
              completion tokens / wall time of the whole burst
Tokens are the server's usage.completion_tokens (stream_options.include_usage) where given,
else the text chunks counted. A new connection per request (llama-server closes idle keep-alive
connections on its own schedule), as bench/compare.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "Once upon a time"
# The remote run uses the defaults; the environment shortens them for smoke tests on a CPU.
DECODE_TOKENS = int(os.environ.get("BENCH_DECODE_TOKENS", "256"))
TTFT_SAMPLES = int(os.environ.get("BENCH_TTFT_SAMPLES", "9"))
AGG_LEVELS = tuple(int(x) for x in os.environ.get("BENCH_AGG_LEVELS", "4,16").split(","))
TARGET = 0.9
"""The issue's target: myllm's decode at least this share of llama-server's, alone and with 4 and 16 clients."""


# -- small helpers ---------------------------------------------------------------------------

def cmd_freeport(args: argparse.Namespace) -> None:
    import socket

    socks, ports = [], []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def cmd_wait(args: argparse.Namespace) -> None:
    import httpx

    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(args.url.rstrip("/") + "/health", timeout=2)
            if r.status_code == 200:
                print(json.dumps({"url": args.url, "ready": True}))
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    print(json.dumps({"url": args.url, "ready": False, "last": last}))
    sys.exit(1)


# -- b: llama-cpp-python in process ----------------------------------------------------------

def cmd_inproc(args: argparse.Namespace) -> None:
    import llama_cpp

    result: dict[str, Any] = {"model": args.model, "n_gpu_layers": -1, "n_ctx": 2048, "flash_attn": True,
                              "max_tokens": DECODE_TOKENS, "prompt": PROMPT,
                              "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
                              "lib": str(llama_cpp.llama_cpp._lib._name)}
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model, n_gpu_layers=-1, n_ctx=2048, flash_attn=True, verbose=False)
    result["load_s"] = time.perf_counter() - t
    runs = []
    for i in range(args.runs + 1):  # the first run is a warm-up
        times = []
        finish = None
        started = time.perf_counter()
        for chunk in llm.create_completion(PROMPT, max_tokens=DECODE_TOKENS, temperature=0, stream=True):
            choice = chunk["choices"][0]
            if choice.get("text"):
                times.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
        run = {"chunks": len(times), "finish": finish, "n_tokens_ctx": int(llm.n_tokens),
               "ttft_ms": (times[0] - started) * 1000 if times else None,
               "decode_tps": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None}
        if i > 0:
            runs.append(run)
        else:
            result["warmup"] = run
    rates = [r["decode_tps"] for r in runs if r["decode_tps"]]
    result["runs"] = runs
    result["decode_tps_best"] = max(rates) if rates else None
    result["decode_tps_median"] = statistics.median(rates) if rates else None
    llm.close()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


# -- c: two servers, one client ----------------------------------------------------------------

def _limits():
    import httpx

    return httpx.Limits(max_keepalive_connections=0, max_connections=256)


async def stream_completion(http: Any, model: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_event = first = last = None
    chunks = 0
    usage_tokens = None
    timings = None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:].strip()
            if payload == "[DONE]":
                break
            data = json.loads(payload)
            now = time.perf_counter()
            if isinstance(data, dict) and data.get("error"):
                raise RuntimeError(f"stream error: {str(data['error'])[:300]}")
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens")
            if data.get("timings"):
                timings = data["timings"]
            choices = data.get("choices") or []
            if choices:
                first_event = first_event or now
                if choices[0].get("text"):
                    first = first or now
                    last = now
                    chunks += 1
    end = time.perf_counter()
    n = usage_tokens if usage_tokens is not None else chunks
    return {"tokens": n, "chunks": chunks, "usage_tokens": usage_tokens,
            "ttft": ((first_event or end) - started),
            "decode": (n - 1) / (last - first) if first is not None and last is not None and last > first and n > 1 else None,
            "end": end, "started": started, "timings": timings}


async def m_decode(url: str, model: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=_limits()) as http:
        r = await stream_completion(http, model, DECODE_TOKENS)
    return {"decode_tps": r["decode"], "tokens": r["tokens"], "chunks": r["chunks"],
            "server_predicted_per_second": (r["timings"] or {}).get("predicted_per_second")}


async def m_ttft(url: str, model: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=_limits()) as http:
        firsts = [(await stream_completion(http, model, 1))["ttft"] * 1000 for _ in range(TTFT_SAMPLES)]
    return {"ttft_ms": statistics.median(firsts), "samples_ms": firsts}


async def m_aggregate(url: str, model: str, clients: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=_limits()) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(http, model, DECODE_TOKENS) for _ in range(clients)))
        wall = max(r["end"] for r in results) - started
    tokens = sum(r["tokens"] for r in results)
    return {"tps": tokens / wall, "tokens": tokens, "wall_s": wall}


def _spec(text: str) -> tuple[str, str, str]:
    name, rest = text.split("=", 1)
    url, model = rest.rsplit("@", 1)
    return name, url, model


def _gpu_snapshot() -> str | None:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip().replace("\n", "; ")
        return f"{gpu}; processes: {apps or 'none'}"
    except Exception:
        return None


def cmd_servers(args: argparse.Namespace) -> None:
    import httpx

    servers = [_spec(x) for x in (args.a, args.b) if x]  # --a may be absent: B alone
    names = [s[0] for s in servers]
    out: dict[str, Any] = {"prompt": PROMPT, "decode_tokens": DECODE_TOKENS, "ttft_samples": TTFT_SAMPLES,
                           "rounds": args.rounds, "order": "A B per round, each figure in turn",
                           "servers": {n: {"url": u, "model": m} for n, u, m in servers}, "errors": []}
    deadline = time.monotonic() + args.budget

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))

    # Warm-up: the model load (myllm loads on first use), first allocations, CUDA graphs for 1-4 sequences.
    for name, url, model in servers:
        t = time.perf_counter()
        try:
            asyncio.run(m_decode(url, model))
            asyncio.run(m_aggregate(url, model, 4))
        except Exception as exc:
            out["errors"].append(f"warm-up {name}: {exc!r}")
        out["servers"][name]["warmup_s"] = time.perf_counter() - t
        for route, key in (("/api/ps", "api_ps"), ("/status", "status")):  # myllm's: where the model runs
            try:
                answer = httpx.get(url + route, timeout=5)
                if answer.status_code == 200 and answer.headers.get("content-type", "").startswith("application/json"):
                    out["servers"][name][key] = answer.json()
            except Exception:
                pass
        try:
            props = httpx.get(url + "/props", timeout=5)
            if props.status_code == 200:
                p = props.json()
                out["servers"][name]["props"] = {k: p.get(k) for k in ("total_slots", "model_path", "build_info")}
        except Exception:
            pass
    out["gpu_after_warmup"] = _gpu_snapshot()
    save()

    figures: list[tuple[str, Any]] = [("decode", m_decode), ("ttft", m_ttft)]
    figures += [(f"agg{n}", (lambda url, model, n=n: m_aggregate(url, model, n))) for n in AGG_LEVELS]
    samples: dict[str, dict[str, list[Any]]] = {n: {} for n in names}
    for fig, fn in figures:
        for r in range(args.rounds):
            for name, url, model in servers:
                if time.monotonic() > deadline:
                    out["errors"].append(f"budget spent before {fig} round {r + 1} on {name}")
                    continue
                try:
                    value = asyncio.run(fn(url, model))
                except Exception as exc:
                    value = {"error": repr(exc)}
                    out["errors"].append(f"{fig} round {r + 1} {name}: {exc!r}")
                samples[name].setdefault(fig, []).append(value)
                print(f"  {fig:6s} round {r + 1} {name:13s} {json.dumps(_headline(fig, value))}", file=sys.stderr, flush=True)
        out["samples"] = samples
        save()

    key = {"decode": "decode_tps", "ttft": "ttft_ms", **{f"agg{n}": "tps" for n in AGG_LEVELS}}
    summary: dict[str, dict[str, float | None]] = {}
    for name in names:
        summary[name] = {}
        for fig, k in key.items():
            vals = [s.get(k) for s in samples[name].get(fig, []) if isinstance(s.get(k), (int, float))]
            summary[name][fig] = statistics.median(vals) if vals else None
    a, b = names if len(names) == 2 else (names[0], names[0])
    ratios: dict[str, float | None] = {}
    for fig, k in key.items() if len(names) == 2 else ():
        pairs = [(x.get(k), y.get(k)) for x, y in zip(samples[a].get(fig, []), samples[b].get(fig, []))]
        vals = [x / y for x, y in pairs if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y]
        ratios[fig] = statistics.median(vals) if vals else None
    out["summary"] = summary
    out["paired_ratio_a_over_b"] = ratios
    out["gpu_after"] = _gpu_snapshot()
    save()
    print(json.dumps({"summary": summary, "paired_ratio_a_over_b": ratios, "errors": out["errors"]}, indent=1))


def _headline(fig: str, value: dict[str, Any]) -> dict[str, Any]:
    if "error" in value:
        return {"error": value["error"][:120]}
    keep = {"decode": ("decode_tps", "tokens"), "ttft": ("ttft_ms",)}.get(fig, ("tps", "tokens", "wall_s"))
    return {k: (round(value[k], 2) if isinstance(value.get(k), float) else value.get(k)) for k in keep}


# -- report ----------------------------------------------------------------------------------

def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def _bench_rows(data: Any) -> dict[str, float]:
    """llama-bench -o json: {"pp512": t/s, "tg128": t/s}."""
    rows = {}
    for t in data or []:
        label = f"pp{t['n_prompt']}" if t.get("n_prompt") else f"tg{t['n_gen']}"
        rows[label] = t.get("avg_ts")
    return rows


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return str(v)


def cmd_report(args: argparse.Namespace) -> None:
    work = Path(args.work)
    doc: dict[str, Any] = {"meta": _load(work / "meta.json") or {}, "models": {}}
    lines = ["# GPU check (issue 21): myllm against llama.cpp on the same GPU", ""]
    meta = doc["meta"]
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()]
        lines.append("")
    for label in ("small", "1b"):
        d = work / label
        if not d.is_dir() or not any((d / f).exists() for f in ("bench_gpu.json", "bench_cpu.json", "inproc.json", "servers.json")):
            continue
        m: dict[str, Any] = {}
        m["model"] = _load(d / "model.json")
        m["llama_bench_gpu"] = _load(d / "bench_gpu.json")
        m["llama_bench_cpu"] = _load(d / "bench_cpu.json")
        m["inproc"] = _load(d / "inproc.json")
        m["servers"] = _load(d / "servers.json")
        doc["models"][label] = m
        title = {"small": "SmolLM2-135M-shaped", "1b": "Llama-3.2-1B-shaped"}[label]
        desc = (m["model"] or {}).get("desc", "")
        lines += [f"## {title} ({desc})", ""]
        g, c = _bench_rows(m["llama_bench_gpu"]), _bench_rows(m["llama_bench_cpu"])
        if g or c:
            cols = sorted(set(g) | set(c), key=lambda x: (x[:2] != "pp", int(x[2:])))
            lines += ["| llama-bench (engine roof) | " + " | ".join(f"{x} t/s" for x in cols) + " |",
                      "| --- |" + " ---: |" * len(cols)]
            for label, rows, data in (("GPU", g, m["llama_bench_gpu"]), ("CPU only (CUDA_VISIBLE_DEVICES='')", c, m["llama_bench_cpu"])):
                if rows:
                    t = data[0]
                    lines.append(f"| {label}, -ngl {t.get('n_gpu_layers')} -t {t.get('n_threads')}, {t.get('backends')} | "
                                 + " | ".join(_fmt(rows.get(x)) for x in cols) + " |")
            lines.append("")
        ip = m["inproc"]
        if ip:
            lines += [f"llama-cpp-python in process (n_gpu_layers=-1, n_ctx 2048, flash_attn): decode "
                      f"{_fmt(ip.get('decode_tps_best'))} tok/s best of {len(ip.get('runs') or [])} "
                      f"(median {_fmt(ip.get('decode_tps_median'))}); GPU offload supported: "
                      f"{ip.get('gpu_offload_supported')}", ""]
        sv = m["servers"]
        if sv and sv.get("summary"):
            names = list(sv["servers"])
            a, b = names if len(names) == 2 else (names[0], names[0])
            s, r = sv["summary"], sv.get("paired_ratio_a_over_b", {})
            rows = [(f"single-stream decode, {sv.get('decode_tokens')} tokens (tok/s)", "decode"),
                    ("time to first token, max_tokens 1 (ms)", "ttft")]
            rows += [(f"aggregate, {fig[3:]} concurrent streams (tok/s)", fig) for fig in s[a] if fig.startswith("agg")]
            lines += [f"| figure | {a} | {b} | {a} / {b} |", "| --- | ---: | ---: | ---: |"]
            for text, fig in rows:
                lines.append(f"| {text} | {_fmt(s[a].get(fig))} | {_fmt(s[b].get(fig))} | {_fmt(r.get(fig), 2)}x |")
            lines.append("")
            lines.append(f"Medians of {sv.get('rounds')} rounds (A B A B); ratios are medians of each round's ratio. "
                         f"GPU after warm-up: {sv.get('gpu_after_warmup')}.")
            lines.append("")
            for fig, text in (("decode", "single-stream decode"), ("agg4", "decode, 4 clients"), ("agg16", "decode, 16 clients")):
                ratio = r.get(fig)
                verdict = "n/a" if ratio is None else ("met" if ratio >= TARGET else "MISSED")
                shown = "n/a" if ratio is None else f"{ratio:.2f}x"
                lines.append(f"- target {text} >= {TARGET}x {b}: {shown}, {verdict}")
            lines.append("")
            for name in (a, b):
                got = sv["servers"][name] or {}
                for m in (got.get("api_ps") or {}).get("models", []):
                    if "processor" in m:  # myllm's own /api/ps
                        lines.append(f"- {name} /api/ps: {m.get('name')} {m.get('processor')}, {m.get('gpu_layers')}/"
                                     f"{m.get('layers')} layers on the GPU, estimate {m.get('size_mb')} MiB of which "
                                     f"{m.get('size_vram_mb')} MiB GPU, measured GPU {m.get('vram_used_mb')} MiB, "
                                     f"RSS {m.get('memory_mb')} MiB")
                system = (got.get("status") or {}).get("system")
                if system:
                    lines.append(f"- {name} /status: " + ", ".join(f"{k} {system.get(k)}" for k in (
                        "gpu_available", "gpu_name", "gpu_memory_total_mb", "gpu_memory_used_mb")))
            if sv.get("errors"):
                lines.append(f"Errors: {'; '.join(sv['errors'])[:1500]}")
            lines.append("")
        elif sv:
            lines += [f"Server measurements incomplete: {json.dumps(sv.get('errors'))[:1000]}", ""]
    notes = work / "notes.txt"
    if notes.is_file():
        lines += ["## Notes", "", notes.read_text()]
    text = "\n".join(lines) + "\n"
    Path(args.md).write_text(text)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("freeport")
    p.add_argument("n", type=int, nargs="?", default=1)
    p.set_defaults(fn=cmd_freeport)
    p = sub.add_parser("wait")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=90)
    p.set_defaults(fn=cmd_wait)
    p = sub.add_parser("inproc")
    p.add_argument("model")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    p.set_defaults(fn=cmd_inproc)
    p = sub.add_parser("servers")
    p.add_argument("--a", help="NAME=URL@MODEL (optional: B alone)")
    p.add_argument("--b", required=True, help="NAME=URL@MODEL")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--budget", type=float, default=150, help="seconds; figures past it are skipped")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_servers)
    p = sub.add_parser("report")
    p.add_argument("work")
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
