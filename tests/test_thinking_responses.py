"""A thinking model through OpenAI's Responses API, with the official openai client against a
real daemon: `reasoning.effort`, the thinking as a `reasoning` output item apart from the
message (streamed and not), reasoning tokens in the usage, and chains that keep it apart. The
fixture model is test_thinking_api's: SmolLM2 with a Qwen3-style template and a thinking
budget as a Modelfile PARAMETER, so the split is deterministic at temperature 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response, ResponseReasoningItem

import tests.server
from myllm.settings import Settings
from tests.server import running_server
from tests.test_thinking_api import thinker_home

QUESTION = "What is two and two?"
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 40}


@pytest.fixture(scope="module")
def client(models_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    home = thinker_home(models_home, tmp_path_factory.mktemp("thinking-responses"))
    with running_server(Settings(home=home, num_threads=2, num_ctx=1024)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


def reasoning_of(response: Response) -> str:
    """The reasoning item's text; the item is first and has no summary."""
    item = response.output[0]
    assert isinstance(item, ResponseReasoningItem) and item.id.startswith("rs_") and item.summary == [], response
    assert item.content is not None and [c.type for c in item.content] == ["reasoning_text"]
    return item.content[0].text


def test_reasoning_apart_from_the_answer_streamed_and_not(client: OpenAI) -> None:
    whole = client.responses.create(model="thinker", input=QUESTION, **GREEDY)
    assert [o.type for o in whole.output] == ["reasoning", "message"]
    thinking, answer = reasoning_of(whole), whole.output_text
    assert thinking and answer
    assert "<think>" not in thinking + answer and "</think>" not in thinking + answer and thinking not in answer
    assert whole.usage and 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens

    events = list(client.responses.create(model="thinker", input=QUESTION, stream=True, **GREEDY))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning_deltas = [e for e in events if e.type == "response.reasoning_text.delta"]
    text_deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in reasoning_deltas) == thinking
    assert "".join(e.delta for e in text_deltas) == answer
    assert events.index(reasoning_deltas[-1]) < events.index(text_deltas[0]), "the thinking, then the answer"
    assert {e.output_index for e in reasoning_deltas} == {0} and {e.output_index for e in text_deltas} == {1}
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    kinds = [e.type for e in events]
    reasoning_end = ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
    start = kinds.index("response.reasoning_text.done")
    assert kinds[start:start + 3] == reasoning_end
    assert next(e for e in events if e.type == "response.reasoning_text.done").text == thinking
    final = events[-1].response
    assert reasoning_of(final) == thinking and final.output_text == answer

    assert whole.status == "completed"  # the SDK's stream() helper has a final response only then
    with client.responses.stream(model="thinker", input=QUESTION, **GREEDY) as stream:  # the SDK's own accumulation
        helped = stream.get_final_response()
    assert reasoning_of(helped) == thinking and helped.output_text == answer


def test_an_effort_level_thinks_and_none_or_minimal_do_not(client: OpenAI) -> None:
    default = client.responses.create(model="thinker", input=QUESTION, **GREEDY)
    high = client.responses.create(model="thinker", input=QUESTION, reasoning={"effort": "high", "summary": "auto"}, **GREEDY)
    assert (reasoning_of(high), high.output_text) == (reasoning_of(default), default.output_text)
    assert high.reasoning and high.reasoning.effort == "high"
    for effort in ("none", "minimal"):
        off = client.responses.create(model="thinker", input=QUESTION, reasoning={"effort": effort}, **GREEDY)
        assert [o.type for o in off.output] == ["message"] and off.output_text
        assert off.output_text != default.output_text, "the section was closed before the model wrote"
        assert off.usage and off.usage.output_tokens_details.reasoning_tokens == 0
        events = list(client.responses.create(model="thinker", input=QUESTION, reasoning={"effort": effort}, stream=True,
                                              **GREEDY))
        assert not [e for e in events if e.type.startswith("response.reasoning")]
        assert events[-1].response.output_text == off.output_text


def test_a_reply_cut_while_thinking_is_its_incomplete_reasoning_alone(client: OpenAI) -> None:
    cut = client.responses.create(model="thinker", input=QUESTION, max_output_tokens=3, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details and cut.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status) for o in cut.output] == [("reasoning", "incomplete")] and cut.output_text == ""
    events = list(client.responses.create(model="thinker", input=QUESTION, max_output_tokens=3, temperature=0, stream=True))
    assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning"]
    assert events[-1].type == "response.incomplete" and reasoning_of(events[-1].response) == reasoning_of(cut)


def test_an_effort_no_client_lists_is_a_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="thinker", input=QUESTION, reasoning={"effort": "extreme"})  # type: ignore[typeddict-item]
    assert refused.value.param == "reasoning.effort"


def test_an_effort_level_on_a_model_that_cannot_think_is_a_400_and_none_is_not(client: OpenAI) -> None:
    """Thinking asked of a model that cannot think is refused as OpenAI refuses `reasoning.effort`
    for its models without reasoning (an `invalid_request_error` whose `param` names it), before
    a stream starts; asking for no thinking (`none`, `minimal`) is accepted on any model."""
    for effort in ("low", "medium", "high", "xhigh"):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(model="smollm2:135m", input=QUESTION, reasoning={"effort": effort}, stream=stream,
                                        **GREEDY)
            error = refused.value.body
            assert refused.value.param == "reasoning.effort" and isinstance(error, dict), error
            assert error["type"] == "invalid_request_error" and "does not support thinking" in error["message"]
    plain = client.responses.create(model="smollm2:135m", input=QUESTION, **GREEDY)
    for effort in ("none", "minimal"):
        asked = client.responses.create(model="smollm2:135m", input=QUESTION, reasoning={"effort": effort}, **GREEDY)
        assert [o.type for o in asked.output] == ["message"] and asked.output_text == plain.output_text


def test_a_chain_keeps_the_thinking_out_of_the_next_prompt(client: OpenAI) -> None:
    first = client.responses.create(model="thinker", input="My name is Zanzibar. Remember it.", **GREEDY)
    second = client.responses.create(model="thinker", previous_response_id=first.id, input="What is my name?", **GREEDY)
    thinking = reasoning_of(first)
    assert reasoning_of(second) and second.output_text
    services = tests.server.LAST_APP.state.services  # type: ignore[union-attr]
    _, messages = services.responses.conversation(second.id)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].content == first.output_text and messages[3].content == second.output_text
    assert reasoning_of(client.responses.retrieve(first.id)) == thinking, "the stored response keeps its reasoning"
    assert reasoning_of(client.responses.retrieve(second.id)) == reasoning_of(second)

    # A client managing the context itself sends the first reply's items back, the reasoning
    # item included: it is accepted and left out, so the prompt is the chain's own.
    sent_back = client.responses.create(model="thinker", store=False, input=[
        {"role": "user", "content": "My name is Zanzibar. Remember it."},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": "What is my name?"},
    ], **GREEDY)
    assert sent_back.usage and second.usage and sent_back.usage.input_tokens == second.usage.input_tokens
    assert reasoning_of(sent_back)
