"""make bench's report: the Markdown tables (printed and written to bench/results/latest.md),
every figure and sample as JSON (latest.json), and the aggregate throughput chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"  # make bench's; --results names another
VARIANT_LABELS = {"taking_turns": "agents taking turns", "at_once": "agents all at once"}

Row = tuple[str, float, float, float | None]  # figure, myllm, llama-server, paired ratio (None: a / b)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def plain_rows(m: dict[str, Any], s: dict[str, Any]) -> list[Row]:
    paired = m["paired_ratios"]
    one_m, one_s, eight_m, eight_s = m["chat_1_session"], s["chat_1_session"], m["chat_8_sessions"], s["chat_8_sessions"]
    rows: list[Row] = [
        ("single-stream decode (tok/s)", m["single"]["decode_tps"], s["single"]["decode_tps"], paired["single"]),
        ("time to first token (ms)", m["single"]["ttft_ms"], s["single"]["ttft_ms"], paired["ttft"]),
        *[(f"aggregate decode, {n} clients (tok/s)", m["aggregate"][n], s["aggregate"][n], paired[f"aggregate_{n}"])
          for n in ("1", "2", "4", "8")],
        ("decode with top-5 probabilities (tok/s)", m["probabilities"]["decode_tps"], s["probabilities"]["decode_tps"],
         paired["probabilities"]),
    ]
    for label, a, b in (("1 session", one_m, one_s), ("8 sessions", eight_m, eight_s)):
        rows += [
            (f"chat turn 2, first token (ms), {label}", a["ttft_ms"][1], b["ttft_ms"][1], None),
            (f"chat turn 10, first token (ms), {label}", a["ttft_ms"][9], b["ttft_ms"][9], None),
            (f"chat turn 2, prompt eval (ms, server), {label}", a["prompt_ms"][1], b["prompt_ms"][1], None),
            (f"chat turn 10, prompt eval (ms, server), {label}", a["prompt_ms"][9], b["prompt_ms"][9], None),
            (f"chat turn 2, prompt tokens evaluated, {label}", a["prompt_n"][1], b["prompt_n"][1], None),
            (f"chat turn 10, prompt tokens evaluated, {label}", a["prompt_n"][9], b["prompt_n"][9], None),
        ]
    return rows


def agent_rows(m: dict[str, Any], s: dict[str, Any]) -> list[Row]:
    return [(f"{label}, first token of turns 2+ (ms)", m["agents"][v]["later_turns_ttft_ms"],
             s["agents"][v]["later_turns_ttft_ms"], m["agents"][v]["later_turns_paired_ratio"])
            for v, label in VARIANT_LABELS.items()]


def fast_rows(fast: dict[str, Any]) -> list[Row]:
    m, s = fast["myllm"], fast["llama_server"]
    paired = m["paired_ratios"]
    return [("fast engine: single-stream decode (tok/s)", m["single"]["decode_tps"], s["single"]["decode_tps"],
             paired["single"]),
            ("fast engine: time to first token (ms)", m["single"]["ttft_ms"], s["single"]["ttft_ms"], paired["ttft"]),
            *[(f"fast engine: aggregate decode, {n} clients (tok/s)", m["aggregate"][n], s["aggregate"][n],
               paired[f"aggregate_{n}"]) for n in m["aggregate"]]]


def own_ratio_rows(m: dict[str, Any], s: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Each server's figures against its own: how a cost grows, whatever the server's speed."""
    own = [("probabilities / plain decode", m["probabilities"]["decode_tps"] / m["single"]["decode_tps"],
            s["probabilities"]["decode_tps"] / s["single"]["decode_tps"])]
    for label, key in (("1 session", "chat_1_session"), ("8 sessions", "chat_8_sessions")):
        a, b = m[key], s[key]
        own += [(f"turn 10 / turn 2, first token, {label}", a["ttft_ms"][9] / a["ttft_ms"][1],
                 b["ttft_ms"][9] / b["ttft_ms"][1]),
                (f"turn 10 / turn 2, prompt eval, {label}", a["prompt_ms"][9] / a["prompt_ms"][1],
                 b["prompt_ms"][9] / b["prompt_ms"][1]),
                (f"turn 10 / turn 2, prompt eval per evaluated token, {label}",
                 (a["prompt_ms"][9] / a["prompt_n"][9]) / (a["prompt_ms"][1] / a["prompt_n"][1]),
                 (b["prompt_ms"][9] / b["prompt_n"][9]) / (b["prompt_ms"][1] / b["prompt_n"][1]))]
    return own


def agent_turn_table(results: dict[str, Any]) -> list[str]:
    """Per variant and turn: prompt tokens, tokens evaluated and reused (the servers' own
    `timings`), first token at the client, for both servers."""
    m, s = results["myllm"]["agents"], results["llama_server"]["agents"]
    sc = results["agent_scenario"]
    lines = [f"Agent scenario: {sc['agents']} agents over {results['llama_server_parallel']} sequences, a ~2,000-token "
             f"system prompt shared by all, {sc['turns']} turns, each resending the whole conversation through "
             f"`/v1/chat/completions`; {sc['rounds']} rounds per server and variant, each agent's first message "
             "fresh per round; medians over agents and rounds. Prompt tokens, evaluated and reused are each "
             "server's own counts (`usage.prompt_tokens`, `timings.prompt_n`, `timings.cache_n`).", "",
             "| agents | turn | prompt tokens (myllm / llama-server) | evaluated (myllm / llama-server) "
             "| reused (myllm / llama-server) | first token, ms (myllm / llama-server) | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pair(a: float, b: float, digits: int = 0) -> str:
        return f"{a:.{digits}f} / {b:.{digits}f}"

    for variant, label in VARIANT_LABELS.items():
        a, b = m[variant]["per_turn"], s[variant]["per_turn"]
        for t in range(len(a["ttft_ms"])):
            lines.append(f"| {label} | {t + 1} | {pair(a['prompt_tokens'][t], b['prompt_tokens'][t])} "
                         f"| {pair(a['prompt_n'][t], b['prompt_n'][t])} | {pair(a['cache_n'][t], b['cache_n'][t])} "
                         f"| {pair(a['ttft_ms'][t], b['ttft_ms'][t], 1)} | {ratio(a['ttft_ms'][t], b['ttft_ms'][t])} |")
    return lines


def write(results: dict[str, Any], folder: Path = RESULTS) -> None:
    m, s = results["myllm"], results["llama_server"]
    rows = [*plain_rows(m, s), *agent_rows(m, s), *fast_rows(results["fast_engine"]),
            ("peak RSS (MB), decode/first token/aggregate", m["peak_rss_mb"], s["peak_rss_mb"], None),
            ("peak RSS (MB), chat sessions", m["peak_rss_chat_mb"], s["peak_rss_chat_mb"], None),
            ("peak RSS (MB), agents", m["peak_rss_agents_mb"], s["peak_rss_agents_mb"], None)]
    lines = [f"Model {results['model']}, {results['threads']} threads, context {results['ctx']} "
             f"(llama-server -np {results['llama_server_parallel']}). The servers are measured in turn, "
             f"{results['rounds']} rounds ({results['agent_scenario']['rounds']} for the agents); figures are medians, "
             "and the ratios of the decode, first-token, agent and fast-engine rows are medians of each round's ratio. "
             "Fast engine: a tiny random-weight model with SmolLM2's tokenizer and metadata (2 layers of width 64, "
             "a llama.cpp step of a fraction of a millisecond, as on a GPU), 16 sequences per server. "
             "Peak RSS is over each server's process tree, taken anew for each phase; in the agent phase "
             "llama-server keeps prompts beyond its slots in RAM (`--cache-ram`, up to 8 GiB by default) and "
             "myllm keeps saved KV states within `MYLLM_KV_CACHE`, so that row shows what each cache holds "
             "within its own budget, not a like-for-like footprint.", "",
             "| figure | myllm | llama-server | myllm / llama-server |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {ratio(a, b) if r is None else f'{r:.2f}x'} |" for name, a, b, r in rows]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | |" for name, a, b in own_ratio_rows(m, s)]
    lines += ["", *agent_turn_table(results)]
    table = "\n".join(lines)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest.json").write_text(json.dumps(results, indent=2))
    (folder / "latest.md").write_text(table + "\n")
    print(table)
    chart(results, folder)


def chart(results: dict[str, Any], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return
    levels = [1, 2, 4, 8]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, data in (("myllm", results["myllm"]), ("llama-server", results["llama_server"])):
        ax.plot(levels, [data["aggregate"][str(n)] for n in levels], marker="o", label=label)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate decode (tokens/s)")
    ax.set_title(f"{results['model']}, {results['threads']} threads")
    ax.set_xticks(levels)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=100)


def write_side(name: str, meta: dict[str, Any], rows: list[dict[str, Any]], lines: list[str],
               folder: Path = RESULTS) -> None:
    """A side bench's figures (speculative, LoRA, RPC): `<name>.json` with its settings and rows,
    `<name>.md` with its table, which is printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
