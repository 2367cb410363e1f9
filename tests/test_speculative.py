"""Speculative decoding by prompt lookup (runtime/engine/speculative.py) in the batch engine, on
the real models: the output with drafts verified in one batch is the output without them.

llama.cpp's logits depend on the shape of the batch once a sequence passes 256 KV cells (its
attention then runs over 512 padded cells, with another summation order for one query row than
for several): a verify row's logits then differ from a one-row decode's by up to about 1 (of
logits around 20; measured with SmolLM2 in this file's development). Below 256 cells they are
bit for bit the same, so the exact tests stay under it; the long test goes past it and checks
that any divergence is such a near-tie, not a wrong token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.speculative import PromptLookup, Speculation
from myllm.runtime.engine_types import DoneEvent, LoadSpec, TokenEvent
from tests.engine_calls import generate

DATA = Path(__file__).parent / "data" / "rewrite_source.txt"
EXACT_CELLS = 256
"""KV cells below which a verify row's logits equal a one-row decode's bit for bit."""
NEAR_TIE = 1.5
"""Logit gap below which llama.cpp's batch-shape differences may flip a greedy choice (measured
differences reach about 1)."""


# -- the drafter, pure logic ---------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_longest_tail() -> None:
    lookup = PromptLookup()
    history = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6]
    assert lookup.propose(history, 4) == []  # no 2- or 3-token tail occurred before; one token is too little
    assert lookup.propose([*history, 7], 3) == [2, 3, 6]  # tail (6, 7): after its latest earlier occurrence
    longest = [1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3]
    assert PromptLookup().propose(longest, 4) == [9, 5, 2, 3]  # (1, 2, 3) wins over (2, 3)'s later match


def test_prompt_lookup_never_matches_the_tail_itself_and_indexes_growth() -> None:
    lookup = PromptLookup()
    assert lookup.propose([1, 2], 4) == []  # the only (1, 2) is the tail
    assert lookup.propose([1, 2, 3, 1, 2], 4) == [3, 1, 2]  # draft runs up to the history's end
    assert lookup.propose([1, 2, 3, 1, 2, 9, 1, 2], 4) == [9, 1, 2]  # the latest earlier match wins
    assert lookup.propose([1, 2, 3, 1, 2, 9, 1, 2, 4], 0) == []


def test_speculation_counts_and_adapts_its_draft_length() -> None:
    speculation = Speculation(PromptLookup(), 8)
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2]
    assert speculation.draft(history, 100) == [3, 4, 5, 6, 7, 8, 9, 10]
    speculation.resize(8, 2)
    assert speculation.n == 3
    assert speculation.draft(history, 100) == [3, 4, 5]
    assert speculation.draft(history, 1) == [3]  # room: what max_tokens and the batch leave
    speculation.resize(3, 3)
    assert speculation.n == 6
    assert speculation.drafted == 12


# -- in the engine --------------------------------------------------------------------------------


def copy_prompt(engine: BatchEngine, cells: int) -> list[int]:
    """A prompt that makes a model copy: a passage, the passage again, and its start a third
    time, cut so that the prompt ends `cells` tokens in."""
    paragraph = DATA.read_text().split("\n\n")[0]
    tokens = engine.tokenize(f"{paragraph}\n\n{paragraph}\n\n{paragraph}")
    assert len(tokens) > cells
    return tokens[:cells]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_path: Path) -> Any:
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 1024, draft_max=16), n_threads=2, kv_cache_bytes=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def gemma3_engine(gemma3_path: Path) -> Any:
    engine = BatchEngine(LoadSpec("gemma3", gemma3_path, 1024, draft_max=16), n_threads=2, kv_cache_bytes=0)
    yield engine
    engine.close()


def same_start(engine: BatchEngine, prompt: list[int], **options: Any) -> tuple[list[TokenEvent], DoneEvent]:
    """A generation that starts as every other one of this test does: a throwaway request first
    leaves the slot holding the prompt, so each measured one evaluates the same last tokens
    (a prompt evaluated in other chunks gives other last bits past 256 cells)."""
    generate(engine, prompt, temperature=0, max_tokens=1)
    return generate(engine, prompt, **options)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_greedy_output_is_the_same_with_prompt_lookup(model: str, request: pytest.FixtureRequest) -> None:
    """Bit for bit (under 256 cells): the same tokens, the same text, the same end, with most of
    them coming from accepted drafts."""
    engine = request.getfixturevalue(f"{model}_engine")
    prompt = copy_prompt(engine, 150)
    plain, plain_done = same_start(engine, prompt, temperature=0, max_tokens=EXACT_CELLS - 150 - 2)
    fast, fast_done = same_start(engine, prompt, temperature=0, max_tokens=EXACT_CELLS - 150 - 2, draft_max=16)
    assert [e.token_id for e in fast] == [e.token_id for e in plain]
    assert (fast_done.text, fast_done.finish_reason, fast_done.completion_tokens) == (
        plain_done.text, plain_done.finish_reason, plain_done.completion_tokens)
    assert plain_done.draft_tokens == plain_done.draft_accepted == 0
    assert fast_done.draft_accepted > fast_done.completion_tokens / 3, fast_done  # it did speculate, and copy
    assert fast_done.draft_tokens >= fast_done.draft_accepted


def test_sampled_output_with_a_seed_is_the_same_with_prompt_lookup(smollm2_engine: BatchEngine) -> None:
    """Every emitted token is drawn by the request's own sampler, in order, from its own row:
    with a seed, the random draws, the penalties' memory and so the text are those of the run
    without drafts. A verification that sampled a rejected row, skipped one, or read the wrong
    row would change the text from that token on."""
    prompt = copy_prompt(smollm2_engine, 150)
    options = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234, repeat_penalty=1.05, max_tokens=100,
                   logprobs=1)
    plain, _ = same_start(smollm2_engine, prompt, **options)
    fast, done = same_start(smollm2_engine, prompt, **options, draft_max=16)
    assert [(e.token_id, e.logprob) for e in fast] == [(e.token_id, e.logprob) for e in plain]
    assert done.draft_accepted > 0 and done.draft_tokens > done.draft_accepted  # both paths taken


def test_max_tokens_and_stop_strings_end_speculation_exactly(smollm2_engine: BatchEngine) -> None:
    """A draft never runs past max_tokens, and nothing after a stop string is emitted even when
    the rest of the draft was accepted; the KV then holds what `cached` says."""
    engine = smollm2_engine
    prompt = copy_prompt(engine, 150)
    tokens, done = same_start(engine, prompt, temperature=0, max_tokens=37, draft_max=16)
    assert done.finish_reason == "length" and done.completion_tokens == len(tokens) == 37
    plain, plain_done = same_start(engine, prompt, temperature=0, max_tokens=37)
    stop = plain_done.text[60:75]
    cut, cut_done = same_start(engine, prompt, temperature=0, max_tokens=37, draft_max=16, stop=[stop])
    ref, ref_done = same_start(engine, prompt, temperature=0, max_tokens=37, stop=[stop])
    assert cut_done.finish_reason == "stop" and cut_done.stop_sequence == stop
    assert cut_done.text == ref_done.text == plain_done.text[:60]
    assert [e.token_id for e in cut] == [e.token_id for e in ref]
    slot = engine._slots[0]
    lib = engine._lib
    assert lib.llama_memory_seq_pos_max(lib.llama_get_memory(engine.ctx.ctx), slot.seq) == len(slot.cached) - 1


def test_long_copy_diverges_only_at_a_near_tie(smollm2_engine: BatchEngine) -> None:
    """Past 256 cells verify rows may differ from one-row decodes in the last bits (see the
    module's docstring). The runs must agree token for token until a divergence, and there the
    two picks must be a near-tie of the reference's own logits: a verification bug (a wrong row,
    a stale KV cell) picks tokens the model ranks far lower."""
    engine = smollm2_engine
    prompt = copy_prompt(engine, 200)
    # No repeat penalty: the pick is then the raw logits' argmax, whose gap the log probabilities show.
    plain, _ = same_start(engine, prompt, temperature=0, max_tokens=300, logprobs=2, repeat_penalty=1.0)
    fast, done = same_start(engine, prompt, temperature=0, max_tokens=300, logprobs=2, repeat_penalty=1.0, draft_max=16)
    assert done.draft_accepted > 100, done
    at = next((i for i, (a, b) in enumerate(zip(plain, fast, strict=False)) if a.token_id != b.token_id), None)
    if at is None:
        assert [e.token_id for e in fast] == [e.token_id for e in plain]
        return
    ref = plain[at].top
    assert ref is not None and len(ref) == 2
    assert fast[at].token_id == ref[1].token_id, (at, fast[at], ref)  # the reference's runner-up
    assert ref[0].logprob - ref[1].logprob < NEAR_TIE, (at, ref)
    assert all(abs(a.logprob - b.logprob) < NEAR_TIE / 10 for a, b in zip(plain[:at], fast[:at], strict=True))
