"""The tool-call reader on recorded outputs of each format models write (pure logic, no model)."""

from __future__ import annotations

import json

import pytest

from myllm.errors import InvalidOptions
from myllm.runtime.request.tools import (
    CallFilter,
    Tool,
    ToolUse,
    call_schema,
    check_choice,
    embed,
    may_be_call,
    parse_calls,
    parse_cut_calls,
    parse_tools,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [Tool("get_weather", "", WEATHER), Tool("add", "", {"type": "object", "properties": {"a": {"type": "number"}}})]


@pytest.mark.parametrize(("text", "content", "calls"), [
    # Hermes / Qwen 2.5+
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}', "", [("get_weather", {"city": "Rome"})]),  # unclosed at EOS
    # Llama 3.1 (JSON with "parameters"; with or without the python tag)
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 2}}', "", [("add", {"a": 2})]),
    # Mistral
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, {"name": "add", "arguments": {"a": 3}}]', "",
     [("get_weather", {"city": "Lima"}), ("add", {"a": 3})]),
    # Plain JSON, one or a list; arguments as a JSON string
    ('{"name": "add", "arguments": "{\\"a\\": 4}"}', "", [("add", {"a": 4})]),
    ('[{"name": "add", "arguments": {"a": 5}}]', "", [("add", {"a": 5})]),
    # Not calls: returned as text
    ("The weather is fine.", "The weather is fine.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON, but no call
    ('{"name": "delete_everything", "arguments": {}}', '{"name": "delete_everything", "arguments": {}}', []),  # not offered
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', []),
    ('[TOOL_CALLS] [{"name": "get_weather"', '[TOOL_CALLS] [{"name": "get_weather"', []),  # cut short
    ('{"name": "add", "arguments": [1, 2]}', '{"name": "add", "arguments": [1, 2]}', []),  # arguments not an object
    ('{"name": "add", "arguments": {}, "answer": 1}', '{"name": "add", "arguments": {}, "answer": 1}', []),  # not a call's keys
])
def test_parse_calls(text: str, content: str, calls: list[tuple[str, dict]]) -> None:
    got_content, got = parse_calls(text, TOOLS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "add", "arguments": {"a": }</tool_call>',  # bad JSON
    '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',  # a tool not offered
    '<tool_call>{"name": "add", "arguments": {}}</tool_call>\n<tool_call>garbage</tool_call>',  # one good block, one not
    "<tool_call></tool_call>", "<tool_call>[]</tool_call>", "Let me see. <tool_call>the weather in Paris</tool_call> Done.",
    '{"name": "add", "arguments": {}} Done.', '[{"name": "add", "arguments": {}}] and more',  # text after a call
    '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]', '<|python_tag|>{"name": "add", "parameters": {}} extra',
    '[TOOL_CALLS] not json', '{"name": "add", "arguments": "{\'a\': 1}"}',  # arguments a string that is no JSON
])
def test_what_is_not_a_call_is_all_content_streamed_and_not(text: str) -> None:
    """Output that looks like calls but is none is the reply's content, every character of it,
    whether the reply ended or the token limit cut it, read whole or streamed piece by piece."""
    assert parse_calls(text, TOOLS) == (text, [])
    for cut_off in (False, True):
        for pieces in ([text], list(text)):
            f = CallFilter(TOOLS)
            streamed = "".join(f.feed(p) for p in pieces)
            left, calls = f.finish(cut_off)
            assert (streamed + left, calls) == (text, [])


@pytest.mark.parametrize("pieces", [
    ["<tool", "_call>{\"name\": \"add\", ", "\"arguments\": {\"a\": 1}}</tool_call>"],
    ["  {\"name\"", ": \"add\", \"arguments\": {\"a\": 1}}"],
])
def test_filter_holds_back_what_may_be_a_call(pieces: list[str]) -> None:
    f = CallFilter(TOOLS)
    assert [f.feed(p) for p in pieces] == [""] * len(pieces)
    content, calls = f.finish()
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1})]


def test_filter_streams_text_and_catches_a_later_call() -> None:
    f = CallFilter(TOOLS)
    out = [f.feed(p) for p in ["Sure", ", checking", " now. <to", "ol_call>{\"name\": \"add\", \"arguments\": {}}", "</tool_call>"]]
    assert "".join(out) == "Sure, checking now. "
    content, calls = f.finish()
    assert content == "" and calls[0].name == "add"
    g = CallFilter(TOOLS)
    assert g.feed("{not a call") == "{not a call" and g.finish() == ("", [])


@pytest.mark.parametrize(("pieces", "released"), [
    (['{"answer"', ': 42, "why": "because"}'], 1),  # a key no call has
    (["[1", "] See the paper."], 0),  # a citation, not an array of calls
    (["[", "{", '"name": "get_weather"}, 3'], 2),  # an element that is not a call
    (['{"name": "ad', 'x"'], 1),  # "ad" may be "add"; "adx" names no offered function
    (['{"name": "add", "arguments": {}}', " Done."], 1),  # text after a complete value
    (["{Hello}"], 0),  # not JSON
])
def test_the_hold_back_ends_once_the_text_cannot_be_a_call(pieces: list[str], released: int) -> None:
    """Text that starts like JSON is let through at the first piece after which it cannot be
    calls, so a stream does not stay silent to the end (issue 28)."""
    f = CallFilter(TOOLS)
    out = [f.feed(p) for p in pieces]
    assert out[:released] == [""] * released
    assert "".join(out) == "".join(pieces) and f.finish() == ("", [])


@pytest.mark.parametrize("text", [
    "{", "[", ' [ {"na', '{"name": "get_w', '{"name": "get_weather", "arguments": {"city": "Pa\\',
    '[{"name": "add", "arguments": {"a": 1}}, {"function": {"name": "ad', '{"type": "function", "id": "1", "function": {',
])
def test_what_may_still_be_a_call_is_held(text: str) -> None:
    assert may_be_call(text, TOOLS)
    f = CallFilter(TOOLS)
    assert f.feed(text) == ""


def test_a_forced_reply_is_never_content() -> None:
    f = CallFilter(TOOLS, forced=True)
    assert f.feed('[{"name": "add", "arguments": {"a": 1}}, {"name": "add", "argu') == ""
    content, calls = f.finish(cut_off=True)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1})]
    g = CallFilter(TOOLS, forced=True)
    g.feed('{"name": "get_weather", "arguments": {"city": "Par')
    assert g.finish(cut_off=True) == ("", [])


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('[{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}, {"name": "add", "argu',
     '{"name": "add", "argu', [("add", {"a": 1}), ("add", {"a": 2})]),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}, {"na', '{"na',
     [("get_weather", {"city": "Lima"})]),
    ('Checking.<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "add", "argum',
     'Checking.<tool_call>{"name": "add", "argum', [("add", {"a": 1})]),
    ('<tool_call>{"name": "add", "arguments": {}}</tool_call> Then <tool_call>{"name": "add", "argu',
     'Then <tool_call>{"name": "add", "argu', [("add", {})]),
])
def test_a_cut_off_reply_keeps_its_complete_calls(text: str, content: str, calls: list[tuple[str, dict]]) -> None:
    """The token limit cut these replies in their last call: the calls before it are whole
    (issue 28: they came back as text), and the call cut short is content as it was written,
    not dropped (issue 31)."""
    got = parse_cut_calls(text, TOOLS)
    assert got is not None and got[0] == content and [(c.name, c.arguments) for c in got[1]] == calls
    for pieces in ([text], list(text)):  # streamed whole and character by character
        f = CallFilter(TOOLS)
        streamed = "".join(f.feed(p) for p in pieces)
        left, found = f.finish(cut_off=True)
        assert (streamed + left, [(c.name, c.arguments) for c in found]) == (content, calls)


@pytest.mark.parametrize("text", [
    "The weather is", '{"answer": "it is', '[1, 2', '[{"name": "add", "arguments": {}}, 7',
    '{"name": "add", "arguments": {"a": 1',  # the one call was cut: nothing complete
    '[{"name": "ad", "arguments": {}}, {"name": "add", "argu',  # complete, naming no tool ("ad" might have grown)
    '[{"name": "add", "arguments": "{not json"}, {"name": "add", "argu',  # a complete element whose arguments do not parse
    '<tool_call>{"name": "add", "arguments": {}}</tool_call> and <tool_call>junk</tool_call> then',  # a closed bad block
    '<tool_call>{"name": "add", "argu',
])
def test_a_cut_off_reply_that_is_not_calls_is_content(text: str) -> None:
    assert parse_cut_calls(text, TOOLS) is None
    for pieces in ([text], list(text)):
        f = CallFilter(TOOLS)
        streamed = "".join(f.feed(p) for p in pieces)
        assert (streamed + (left := f.finish(cut_off=True))[0], left[1]) == (text, [])


def test_bad_tools_and_choices_are_refused() -> None:
    for bad in ([{"type": "retrieval"}], [{"type": "function", "function": {"name": "has space"}}],
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
                [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]):
        with pytest.raises(InvalidOptions) as info:
            parse_tools(bad)
        assert info.value.field == "tools"
    with pytest.raises(InvalidOptions) as info:
        check_choice("nope", TOOLS)
    assert info.value.field == "tool_choice"


def test_call_schema_allows_only_the_chosen_calls() -> None:
    named = call_schema(TOOLS, "add", parallel=False, most=8)
    assert named["properties"]["name"] == {"const": "add"}
    several = call_schema(TOOLS, "required", parallel=True, most=8)
    assert several["type"] == "array" and len(several["items"]["anyOf"]) == 2
    assert several["minItems"] == 1 and several["maxItems"] == 8
    assert call_schema(TOOLS, "required", parallel=False, most=8)["anyOf"] == several["items"]["anyOf"]  # one call
    assert "anyOf" in call_schema(TOOLS, "required", parallel=True, most=1)  # a bound of one is one call


NESTED = {"$defs": {"Capital": {"type": "object", "properties": {"city": {"type": "string"}, "kind": {"$ref": "#/$defs/Kind"}},
                                "required": ["city", "kind"]},
                    "Kind": {"enum": ["capital", "town"]}},
          "type": "object", "properties": {"go": {"$ref": "#/$defs/Capital"}, "back": {"$ref": "#/$defs/Capital"}},
          "required": ["go", "back"]}


def test_embedded_schemas_keep_their_references_and_order() -> None:
    """A schema placed in a larger one has its local `$ref`s rebased where it now sits (pydantic
    writes nested models as `#/$defs/...`; issue 28: forced calls to such a tool were a 400)."""
    defs: dict = {}
    assert embed(NESTED, "tool-0", defs) == {"$ref": "#/$defs/tool-0"}
    placed = defs["tool-0"]
    assert placed["properties"]["go"] == {"$ref": "#/$defs/tool-0/$defs/Capital"}
    assert placed["$defs"]["Capital"]["properties"]["kind"] == {"$ref": "#/$defs/tool-0/$defs/Kind"}
    assert list(placed["properties"]) == ["go", "back"]  # the order a grammar writes the keys in
    assert NESTED["properties"]["go"] == {"$ref": "#/$defs/Capital"}  # the tool's own schema untouched


@pytest.mark.parametrize(("choice", "parallel", "requested"), [
    ("required", True, None), ("required", False, None), ("trip", True, None), ("auto", True, NESTED), ("auto", True, "json"),
])
def test_calls_to_tools_with_definitions_compile(choice: str, parallel: bool, requested: object) -> None:
    """Every schema `ToolUse.format` builds from tools (and a requested format) with `$defs`
    resolves: llama.cpp's converter refuses a `$ref` it cannot find."""
    from llama_cpp import llama_grammar

    use = ToolUse([Tool("trip", "", NESTED), *TOOLS], choice, parallel, 8)
    grammar = llama_grammar.json_schema_to_gbnf(json.dumps(use.format(requested)))  # type: ignore[arg-type]
    assert "capital" in grammar and "root ::=" in grammar
