"""A thinking model through Anthropic's Messages API, with the official anthropic SDK against a
real daemon: `thinking` (`enabled` with `budget_tokens`, `disabled`) controls it, its thinking
is a `thinking` block before the text (streamed as `thinking_delta`s and a `signature_delta`),
and a client sends the block back in the next turn. The fixture model is test_thinking_api.py's:
SmolLM2 with a thinking template, whose thinking the budget closes deterministically at
temperature 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, MessageParam

from myllm.settings import Settings
from tests.server import running_server
from tests.test_thinking_api import BUDGET, thinker_home

QUESTION: list[MessageParam] = [{"role": "user", "content": "What is two and two?"}]
GREEDY = {"temperature": 0}
MAX = 40
THINK = {"type": "enabled", "budget_tokens": BUDGET}


@pytest.fixture(scope="module")
def client(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    home = thinker_home(models_home, tmp_path_factory.mktemp("thinking-anthropic"))
    with running_server(Settings(home=home, num_threads=2, num_ctx=1024)) as url:
        yield anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)


def _ask(client: anthropic.Anthropic, thinking: Any = THINK, messages: list[MessageParam] = QUESTION,
         **extra: Any) -> Message:
    return client.messages.create(model="thinker", max_tokens=MAX, messages=messages, thinking=thinking,
                                  extra_body=GREEDY, **extra)


def _parts(message: Message) -> tuple[str, str, str]:
    """(thinking, signature, text) of a message made of a thinking block and a text block."""
    thinking, text = message.content
    assert thinking.type == "thinking" and text.type == "text", message
    return thinking.thinking, thinking.signature, text.text


def test_the_thinking_is_a_block_before_the_text(client: anthropic.Anthropic) -> None:
    m = _ask(client)
    thinking, signature, text = _parts(m)
    assert thinking.strip() and signature and text.strip()
    assert "<think>" not in thinking + text and "</think>" not in thinking + text
    assert m.stop_reason == "end_turn"


def test_output_tokens_count_the_thinking_too(client: anthropic.Anthropic) -> None:
    """max_tokens holds thinking and text together: cut a few tokens into the answer (after the
    budget's thinking and the closing marker), the reply has both blocks and its
    output_tokens are max_tokens."""
    cut = BUDGET + 6
    m = client.messages.create(model="thinker", max_tokens=cut, messages=QUESTION, thinking=THINK,  # type: ignore[arg-type]
                               extra_body=GREEDY)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == cut


def test_a_stream_gives_the_same_blocks(client: anthropic.Anthropic) -> None:
    whole = _ask(client)
    with client.messages.stream(model="thinker", max_tokens=MAX, messages=QUESTION, thinking=THINK,  # type: ignore[arg-type]
                                extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert _parts(final) == _parts(whole) and text == _parts(whole)[2]
    assert final.usage.output_tokens == whole.usage.output_tokens and final.stop_reason == whole.stop_reason


def test_a_reply_cut_while_thinking_is_its_thinking_block_alone(client: anthropic.Anthropic) -> None:
    """max_tokens below the model's own budget (its PARAMETER: `thinking` left to the model)."""
    cut = BUDGET - 2
    whole = client.messages.create(model="thinker", max_tokens=cut, messages=QUESTION, extra_body=GREEDY)
    [block] = whole.content
    assert block.type == "thinking" and block.thinking and block.signature and "<" not in block.thinking
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == cut
    with client.messages.stream(model="thinker", max_tokens=cut, messages=QUESTION, extra_body=GREEDY) as stream:
        assert stream.get_final_message().content == whole.content


def test_raw_events_a_thinking_block_its_signature_then_the_text_block(client: anthropic.Anthropic) -> None:
    thinking, signature, text = _parts(_ask(client))
    events = list(_ask(client, stream=True))
    shape = []
    for e in events:
        kind = e.type
        if e.type == "content_block_start":
            kind = f"start {e.index} {e.content_block.type}"
        elif e.type == "content_block_delta":
            kind = f"{e.index} {e.delta.type}"
        elif e.type == "content_block_stop":
            kind = f"stop {e.index}"
        if not shape or shape[-1] != kind:
            shape.append(kind)
    assert shape == ["message_start", "start 0 thinking", "0 thinking_delta", "0 signature_delta", "stop 0",
                     "start 1 text", "1 text_delta", "stop 1", "message_delta", "message_stop"]
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == thinking
    assert [d.signature for d in deltas if d.type == "signature_delta"] == [signature]
    assert "".join(d.text for d in deltas if d.type == "text_delta") == text


def test_budget_tokens_closes_the_thinking_earlier(client: anthropic.Anthropic) -> None:
    short = _parts(_ask(client, {"type": "enabled", "budget_tokens": 2}))[0]
    longer = _parts(_ask(client, {"type": "enabled", "budget_tokens": BUDGET}))[0]
    assert short and len(short) < len(longer) and longer.startswith(short)


def test_disabled_gives_no_thinking_block(client: anthropic.Anthropic) -> None:
    m = _ask(client, {"type": "disabled"})
    [block] = m.content
    assert block.type == "text" and block.text.strip() and "</think>" not in block.text
    counted = client.messages.count_tokens(model="thinker", messages=QUESTION, thinking={"type": "disabled"})
    assert counted.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)  # the empty block too
    absent = _ask(client, anthropic.omit)  # the model's default: this template thinks
    assert [b.type for b in absent.content] == ["thinking", "text"]
    assert _ask(client, {"type": "adaptive"}).content == absent.content


def _bad_request(call: Any) -> dict[str, Any]:
    with pytest.raises(anthropic.BadRequestError) as info:
        call()
    body = info.value.body
    assert info.value.status_code == 400 and isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error", body
    return body["error"]


def test_thinking_on_a_model_that_cannot_think_is_a_400(client: anthropic.Anthropic) -> None:
    error = _bad_request(lambda: client.messages.create(model="smollm2:135m", max_tokens=MAX, messages=QUESTION,
                                                        thinking=THINK))  # type: ignore[arg-type]
    assert "thinking" in error["message"]
    error = _bad_request(lambda: client.messages.count_tokens(model="smollm2:135m", messages=QUESTION,
                                                              thinking=THINK))  # type: ignore[arg-type]
    assert "thinking" in error["message"]
    off = client.messages.create(model="smollm2:135m", max_tokens=5, messages=QUESTION, thinking={"type": "disabled"})
    assert off.content


@pytest.mark.parametrize("budget", [MAX, MAX + 1, 0])
def test_budget_tokens_must_be_at_least_one_and_below_max_tokens(client: anthropic.Anthropic, budget: int) -> None:
    error = _bad_request(lambda: _ask(client, {"type": "enabled", "budget_tokens": budget}))
    assert "budget_tokens" in error["message"]


def test_a_user_turn_cannot_hold_thinking(client: anthropic.Anthropic) -> None:
    turn: list[MessageParam] = [{"role": "user", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]}]
    assert "thinking" in _bad_request(lambda: _ask(client, messages=turn))["message"]


def test_a_second_turn_sends_the_thinking_back(client: anthropic.Anthropic) -> None:
    first = _ask(client)
    sent_back = [b.model_dump(exclude_none=True) for b in first.content]
    turns: list[MessageParam] = [*QUESTION, {"role": "assistant", "content": sent_back},  # type: ignore[list-item]
                                 {"role": "user", "content": "Now add one to that."}]
    second = _ask(client, messages=turns)
    thinking, _, text = _parts(second)
    assert thinking.strip() and text.strip()
    # the thinking sent back is not part of the prompt: as if the client had sent the text alone
    redacted: list[MessageParam] = [*QUESTION, {"role": "assistant", "content": [
        {"type": "redacted_thinking", "data": "opaque"}, sent_back[1]]}, turns[2]]  # type: ignore[list-item]
    text_only: list[MessageParam] = [*QUESTION, {"role": "assistant", "content": [sent_back[1]]}, turns[2]]  # type: ignore[list-item]
    counts = {client.messages.count_tokens(model="thinker", messages=m, thinking=THINK).input_tokens  # type: ignore[arg-type]
              for m in (turns, redacted, text_only)}
    assert len(counts) == 1
    [count] = counts
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) == count
