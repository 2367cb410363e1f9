"""Thinking apart from the answer, in the engine (runtime/engine/thinking.py): the split as text
streams, markers in any pieces, and the budget after which the engine closes the section
itself. The splitter's rules as pure logic first, then SmolLM2 through the batch engine with a
prompt that opens the section (no thinking model is on the package index; the budget makes the
close deterministic)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.thinking import OutputText, ThinkingSplitter
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, LoadSpec, Thinking, TokenEvent
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.template import THINK
from tests.test_engine import run

SPEC = Thinking(THINK.open, THINK.close, THINK.answer)
"""The `<think>` family's markers, as the daemon passes them."""
OPENED = replace(SPEC, started=True)


def split(pieces: list[str], spec: Thinking) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ThinkingSplitter(spec)
    out = [splitter.feed(p) for p in pieces] + [splitter.finish()]
    return splitter.thinking, splitter.content, out


@pytest.mark.parametrize("pieces", [
    ["Let me see.</think>\n\nThe answer is 4."],
    ["Let me see.", "</", "think", ">", "\n\n", "The answer", " is 4."],
    ["Let me see.<", "/think>\n", "\nThe answer is 4."],
    ["Let me see.</thi", "nk>The answer is 4."],
])
def test_markers_in_any_pieces(pieces: list[str]) -> None:
    thinking, content, out = split(pieces, OPENED)
    assert (thinking, content) == ("Let me see.", "The answer is 4.")
    assert "".join(t for t, _ in out) == thinking and "".join(c for _, c in out) == content


def test_a_model_that_opens_the_section_itself() -> None:
    thinking, content, _ = split(["<th", "ink>\nHmm, two and two.", "</think>\n\nFour."], SPEC)
    assert (thinking, content) == ("Hmm, two and two.", "Four.")


def test_text_that_only_looks_like_a_marker_is_text() -> None:
    thinking, content, _ = split(["a < b and </thin", "g> is not a tag"], OPENED)
    assert (thinking, content) == ("a < b and </thing> is not a tag", "")


def test_a_section_never_closed_is_all_thinking() -> None:
    thinking, content, out = split(["I keep thinking", " about it </th"], OPENED)
    assert (thinking, content) == ("I keep thinking about it </th", "")
    assert out[-1] == ("</th", "")  # held back until the end, then thinking


def test_the_budget_counts_tokens_inside_the_section_only() -> None:
    output = OutputText((), replace(OPENED, budget=3))
    assert [output.feed(b"x") and output.over_budget() for _ in range(3)] == [False, False, True]
    output = OutputText((), replace(SPEC, budget=1))  # not inside: nothing counts
    output.feed(b"Four.")
    assert not output.over_budget()
    assert not OutputText((), None).over_budget()


PROMPT = ("<|im_start|>user\nWhat is two and two?<|im_end|>\n<|im_start|>assistant\n<think>\n")


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> BatchEngine:
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 1024, n_parallel=2), n_threads=2, kv_cache_bytes=0)
    yield engine
    engine.close()


def test_the_budget_closes_the_thinking_and_the_model_answers(engine: BatchEngine) -> None:
    """Five tokens of thinking, then the engine writes `</think>` and a blank line, and what
    the model writes from there is the answer; the events carry each apart, and the done event
    has both whole. Greedy, so the same prompt thinks the same way each time."""
    options = GenerationOptions(temperature=0, max_tokens=24)
    req = GenerationRequest(engine.tokenize(PROMPT), options, ("<|im_end|>",), thinking=replace(OPENED, budget=5))
    events = run(engine, req)
    done = events[-1]
    assert isinstance(done, DoneEvent)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    thinking = "".join(e.thinking for e in tokens)
    answer = "".join(e.text for e in tokens)
    assert (thinking, answer) == (done.thinking, done.text)
    assert thinking and answer and "</think>" not in thinking + answer
    written = engine.vocabulary.markup("</think>\n\n")
    ids = [e.token_id for e in tokens if e.token_id >= 0]
    assert ids[5:5 + len(written)] == written  # the engine's own tokens, right after the budget
    assert 5 < done.thinking_tokens <= 5 + len(written) < done.completion_tokens  # the marker counts as thinking
    free = run(engine, GenerationRequest(engine.tokenize(PROMPT), options, ("<|im_end|>",), thinking=OPENED))
    assert isinstance(free[-1], DoneEvent)
    assert free[-1].thinking.startswith(done.thinking)  # without a budget it goes on thinking


def test_without_thinking_the_output_is_the_answer(engine: BatchEngine) -> None:
    req = GenerationRequest(engine.tokenize(PROMPT), GenerationOptions(temperature=0, max_tokens=8), ("<|im_end|>",))
    done = run(engine, req)[-1]
    assert isinstance(done, DoneEvent) and done.thinking == "" and done.text


def test_max_tokens_holds_around_the_closing_marker(engine: BatchEngine) -> None:
    """A limit that falls on or just after the budget: the output never passes it, and where the
    marker does not fit the output ends as thinking (`length`), never with half a marker."""
    marker = len(engine.vocabulary.markup("</think>\n\n"))
    for limit in range(5, 5 + marker + 3):
        req = GenerationRequest(engine.tokenize(PROMPT), GenerationOptions(temperature=0, max_tokens=limit),
                                ("<|im_end|>",), thinking=replace(OPENED, budget=5))
        done = run(engine, req)[-1]
        assert isinstance(done, DoneEvent)
        assert done.completion_tokens <= limit, limit
        assert "</" not in done.thinking, (limit, done.thinking)
        if limit <= 5 + marker:
            assert (done.finish_reason, done.text) == ("length", ""), limit
