"""gpt-oss's harmony format: the thinking is the analysis channel (`<|channel|>analysis<|message|>`
... `<|end|>`), the answer the final one (`<|start|>assistant<|channel|>final<|message|>` ...),
and the markers are special tokens. The model is tests/harmony_gguf.py's: SmolLM2 with harmony's
special tokens (control tokens in the file, as in gpt-oss's) and gpt-oss's own template.

SmolLM2 never opens the analysis channel itself after `<|start|>assistant`, so the model that
generates ("harmony-thinker") has the same template with a generation prompt that opens it (as
llama.cpp's continuation of a thinking message does) and a thinking budget PARAMETER, after which
the engine closes the channel and opens the final one: deterministic at temperature 0, as
tests/test_thinking_api.py's fixture is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from myllm.pull import pull
from myllm.registry.store import Overrides, Registry
from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.thinking import ThinkingSplitter
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, LoadSpec, Thinking, TokenEvent
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.template import (
    HARMONY,
    THINK,
    render_chat,
    splits_thinking,
    template_name,
    thinking_markup,
)
from myllm.settings import Settings
from tests.conftest import smollm2_file, writable_home
from tests.harmony_gguf import GPT_OSS_TEMPLATE, MARKERS, write_harmony_gguf
from tests.server import running_servers
from tests.test_engine import run
from tests.test_thinking_api import THINK_TEMPLATE

OPENED_TEMPLATE = GPT_OSS_TEMPLATE.read_text().replace(
    "<|start|>assistant\n{%- endif -%}", "<|start|>assistant<|channel|>analysis<|message|>\n{%- endif -%}").replace(
    'strftime_now("%Y-%m-%d")', '"2026-12-04"')
"""gpt-oss's template with a generation prompt that opens the analysis channel, on a fixed date:
its system message says the current date, and each day's prompt made other greedy output (on
2026-12-05 one effort level's answer was empty)."""
BUDGET = 6
QUESTION = [{"role": "user", "content": "What is two and two?"}]
GREEDY = {"temperature": 0, "num_predict": 40}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


@pytest.fixture(scope="session")
def harmony_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_harmony_gguf(smollm2_file(), tmp_path_factory.mktemp("harmony") / "gpt-oss-tiny.gguf")


def test_the_template_says_how_a_model_thinks() -> None:
    official = GPT_OSS_TEMPLATE.read_text()
    assert thinking_markup(official) is HARMONY and template_name(official, "llama") == "harmony"
    assert thinking_markup(THINK_TEMPLATE) is THINK
    assert thinking_markup(None) is None and thinking_markup("{{ messages[0]['content'] }}") is None


@pytest.mark.parametrize("think, level", [("low", "low"), ("medium", "medium"), ("high", "high"), (True, "medium"),
                                          (None, "medium"), (False, "medium")])
def test_effort_levels_reach_the_template_and_gpt_oss_always_thinks(think: bool | str | None, level: str) -> None:
    """A level is the system message's `Reasoning:` line (medium, the template's default, when
    none is asked); thinking off changes nothing, since gpt-oss cannot turn it off, and its
    output is still split (a `<think>` template's is not)."""
    rendered = render_chat(QUESTION, GPT_OSS_TEMPLATE.read_text(), "llama", None, None, think=think)
    assert f"\nReasoning: {level}\n" in rendered.text
    assert rendered.text.endswith("<|start|>assistant") and not rendered.thinking_open  # the model opens it
    opened = render_chat(QUESTION, OPENED_TEMPLATE, "llama", None, None, think=think)
    assert opened.text.endswith(HARMONY.open) and opened.thinking_open
    assert splits_thinking(GPT_OSS_TEMPLATE.read_text(), think)
    assert splits_thinking(THINK_TEMPLATE, think) == (think is not False)


OUTPUT = ("<|channel|>analysis<|message|>Two and two make four.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Four.")


def split(pieces: list[str], started: bool = False) -> tuple[str, str]:
    splitter = ThinkingSplitter(Thinking(HARMONY.open, HARMONY.close, HARMONY.answer, HARMONY.headers, started))
    for piece in pieces:
        splitter.feed(piece)
    splitter.finish()
    return splitter.thinking, splitter.content


@pytest.mark.parametrize("pieces", [
    [OUTPUT],
    [c for c in OUTPUT],
    ["<|channel|>", "analysis", "<|message|>", "Two and two", " make four.", "<|end|>", "<|start|>", "ass", "istant",
     "<|channel|>", "final", "<|message|>", "Four."],
])
def test_the_analysis_channel_apart_from_the_final_one_in_any_pieces(pieces: list[str]) -> None:
    assert split(pieces) == ("Two and two make four.", "Four.")


def test_every_analysis_message_is_thinking_and_an_answer_alone_is_the_answer() -> None:
    second = OUTPUT.replace("<|start|>assistant<|channel|>final", "<|start|>assistant<|channel|>analysis<|message|> "
                            "Yes.<|end|><|start|>assistant<|channel|>final")
    assert split([second]) == ("Two and two make four. Yes.", "Four.")
    assert split(["<|channel|>final<|message|>Four."]) == ("", "Four.")
    assert split(["Two and two.<|end|><|start|>assistant<|channel|>final<|message|>Four."], started=True) == (
        "Two and two.", "Four.")
    assert split(["a <|channel|> that goes nowhere <|end"]) == ("", "a <|channel|> that goes nowhere <|end")


@pytest.fixture(scope="module")
def engine(harmony_gguf: Path) -> Iterator[BatchEngine]:
    engine = BatchEngine(LoadSpec("gpt-oss-tiny", harmony_gguf, 1024, n_parallel=1), n_threads=2, kv_cache_bytes=0)
    yield engine
    engine.close()


def test_the_markers_are_special_tokens_whose_text_reaches_the_splitter(engine: BatchEngine) -> None:
    """Each marker is one token of the model's markup and the engine renders its text (which the
    splitter then takes out); `<|return|>` and `<|call|>` end the generation, `<|end|>` does not
    (a thinking message ends with it)."""
    from llama_cpp import llama_vocab_is_eog

    vocabulary = engine.vocabulary
    for token, text in MARKERS.items():
        assert vocabulary.markup(text) == [token]
        assert vocabulary.token_bytes(token) == text.encode()
        assert llama_vocab_is_eog(vocabulary.pointer, token) == (text in ("<|return|>", "<|call|>"))


def test_the_budget_closes_the_analysis_channel_and_the_model_answers_in_the_final_one(engine: BatchEngine) -> None:
    prompt = render_chat(QUESTION, OPENED_TEMPLATE, "llama", None, None, think="low").text
    spec = Thinking(HARMONY.open, HARMONY.close, HARMONY.answer, HARMONY.headers, started=True, budget=5)
    events = run(engine, GenerationRequest(engine.tokenize(prompt), GenerationOptions(temperature=0, max_tokens=30),
                                           (), thinking=spec))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    written = engine.vocabulary.markup(HARMONY.closing)
    assert [e.token_id for e in tokens][5:5 + len(written)] == written  # <|end|><|start|>assistant<|channel|>final...
    thinking, answer = "".join(e.thinking for e in tokens), "".join(e.text for e in tokens)
    assert (thinking, answer) == (done.thinking, done.text)
    assert thinking and answer and "<|" not in thinking + answer


@pytest.fixture(scope="module")
def urls(models_home: Path, harmony_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """"gpt-oss-tiny" as pulled (gpt-oss's own template from the file) and "harmony-thinker",
    its copy whose prompt opens the analysis channel, with a thinking budget."""
    home = writable_home(models_home, tmp_path_factory.mktemp("harmony-daemon") / "home")
    registry = Registry.open(Settings(home=home))
    pull(registry, Settings(home=home), str(harmony_gguf), name="gpt-oss-tiny")
    registry.copy("gpt-oss-tiny", "harmony-thinker", Overrides(parameters={"thinking_budget": BUDGET},
                                                               template_override=OPENED_TEMPLATE))
    registry.close()
    with running_servers(Settings(home=home, num_threads=2, num_ctx=1024)) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls: tuple[str, str]) -> ollama.Client:
    return ollama.Client(host=urls[1], timeout=120)


def test_gpt_oss_template_is_the_thinking_capability(client: ollama.Client, urls: tuple[str, str]) -> None:
    assert "thinking" in (client.show("gpt-oss-tiny").capabilities or [])
    one = httpx.get(f"{urls[0]}/api/models/gpt-oss-tiny", timeout=30).json()
    assert one["thinking"] is True and one["template"] == "harmony"


def test_ollama_chat_thinking_apart_streamed_and_not(client: ollama.Client) -> None:
    whole = client.chat(model="harmony-thinker", messages=QUESTION, think=True, options=GREEDY)
    thinking, content = whole.message.thinking or "", whole.message.content
    assert thinking and content and "<|" not in thinking + content, whole
    parts = list(client.chat(model="harmony-thinker", messages=QUESTION, think=True, options=GREEDY, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == thinking
    assert "".join(p.message.content for p in parts) == content
    first_answer = next(i for i, p in enumerate(parts) if p.message.content)
    assert all(not p.message.thinking for p in parts[first_answer:])
    off = client.chat(model="harmony-thinker", messages=QUESTION, think=False, options=GREEDY)
    assert (off.message.thinking, off.message.content) == (thinking, content)  # gpt-oss thinks anyway, apart


def test_effort_levels_on_the_ollama_and_openai_apis(client: ollama.Client, urls: tuple[str, str]) -> None:
    """Each level is accepted and the thinking comes apart; the levels' prompts differ in their
    `Reasoning:` line only (the rendering is tested above), so each is its own greedy output."""
    for level in ("low", "medium", "high"):
        answer = client.chat(model="harmony-thinker", messages=QUESTION, think=level, options=GREEDY)  # type: ignore[arg-type]
        assert answer.message.thinking and answer.message.content and "<|" not in answer.message.content
    chat = openai.OpenAI(base_url=f"{urls[0]}/v1", api_key="none")
    whole = chat.chat.completions.create(model="harmony-thinker", messages=QUESTION, temperature=0, max_tokens=40,
                                         reasoning_effort="high")  # type: ignore[arg-type]
    message = whole.choices[0].message
    thinking = getattr(message, "reasoning_content", None)
    assert thinking and message.content and "<|" not in thinking + message.content
    chunks = list(chat.chat.completions.create(model="harmony-thinker", messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                               max_tokens=40, reasoning_effort="high", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == message.content


def test_the_budget_closes_the_thinking_at_n_tokens(client: ollama.Client) -> None:
    short = client.chat(model="harmony-thinker", messages=QUESTION, think=True, options={**GREEDY, "thinking_budget": 2})
    default = client.chat(model="harmony-thinker", messages=QUESTION, think=True, options=GREEDY)
    assert short.message.thinking and default.message.thinking and short.message.content
    assert default.message.thinking.startswith(short.message.thinking)
    assert len(short.message.thinking) < len(default.message.thinking)


def test_a_json_schema_holds_on_the_final_channel_while_the_analysis_is_free(client: ollama.Client) -> None:
    """The format's grammar starts at `<|end|>` and takes the final channel's header before the
    schema: the thinking is what the model thinks without a format, the answer the schema's JSON."""
    free = client.chat(model="harmony-thinker", messages=QUESTION, think=True, options=GREEDY)
    shaped = client.chat(model="harmony-thinker", messages=QUESTION, think=True, options=GREEDY, format=SCHEMA)
    assert shaped.message.thinking == free.message.thinking
    assert isinstance(json.loads(shaped.message.content)["answer"], int)
